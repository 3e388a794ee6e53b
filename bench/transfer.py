"""Transfer benchmark: what each method buys over training from scratch, by target label budget.

Source ``synth_digits`` -> target ``optdigits`` (fixed stratified test split, never used for any
choice). Rows are methods, columns labels per class, cells mean ± std over seeds. Hyper-parameters
are the pipeline's defaults, fixed in advance (no tuning on the test split). Writes a section of
docs/benchmarks.md and docs/transfer_benchmark.png.

    python -m bench.transfer            # full grid, 3 seeds
    python -m bench.transfer --quick    # smoke grid: 1 seed, budgets 0/1/10
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from bench.docs import DOC, machine, write_section

TRANSFER = ["linear_probe", "finetune", "gradual_unfreeze", "joint", "dann", "mcc", "semi"]
UDA = {"dann", "mcc", "semi"}
BUDGETS = [0, 1, 2, 3, 5, 10, None]


def _optim(epochs: int, steps: int | None, batch: int, lr: float = 3e-3):
    from tasks.config import Optim

    return Optim(epochs=epochs, steps_per_epoch=steps, batch_size=batch, lr=lr, weight_decay=5e-4)


def _accuracy(model, test_loader) -> float:
    from tlcore.engine import predict

    logits, y = predict(model, test_loader, "cpu")
    return float((logits.argmax(1) == y).float().mean())


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1 seed, budgets 0/1/10, shorter schedules")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--synth-per-class", type=int, default=500)
    ap.add_argument("--epochs", type=int, default=8, help="target-side epochs (x --steps steps)")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--out", default=str(DOC.parent / "transfer_benchmark.json"))
    ap.add_argument("--render", action="store_true", help="only rewrite the docs from the saved --out results")
    args = ap.parse_args(argv)
    if args.render:
        saved = json.loads(Path(args.out).read_text())
        cols = saved.get("columns") or sorted({c for r in saved["results"].values() for c in r if c != "all"}, key=int)
        budgets = [None if c == "all" else int(c) for c in cols]
        return _write(saved["results"], saved["times"], saved["seeds"], budgets, args, saved.get("wall_s"))
    import torch

    from tasks.training import TrainJob, run_job
    from tlcore import data, datasets, models

    torch.set_num_threads(max(1, torch.get_num_threads()))
    seeds = list(range(1 if args.quick else args.seeds))
    budgets = [0, 1, 10] if args.quick else BUDGETS
    epochs = max(2, args.epochs // 2) if args.quick else args.epochs
    spec = models.get_spec("smallcnn")
    results: dict[str, dict[str, list[float]]] = {}
    times: dict[str, list[float]] = {}

    def record(method, budget, acc, secs):
        col = "all" if budget is None else str(budget)
        results.setdefault(method, {}).setdefault(col, []).append(acc)
        times.setdefault(method, []).append(secs)
        print(f"  {method:<17} labels/class={col:<4} acc={acc:.4f} ({secs:.0f} s)", flush=True)

    def run(job):
        return run_job(job, "cpu", log=None)[0]

    t_all = time.time()
    for seed in seeds:
        print(f"seed {seed}: pretraining the source model", flush=True)
        source, target, test = datasets.digits_task(spec, args.synth_per_class, seed=seed)
        test_loader = data.make_loader(test, 512, train=False)
        t = time.time()
        src = run(TrainJob("smallcnn", 10, "scratch", _optim(6, None, 128), seed, labeled=source))
        src_state = {k: v.clone() for k, v in src.state_dict().items()}
        record("source_only", 0, _accuracy(src, test_loader), time.time() - t)
        for budget in budgets:
            split = data.label_budget_split(target.targets.numpy(), budget, seed)
            labeled = target.subset(split.labeled)
            pool = target  # the unlabeled pool: the whole target training split, labels unused (never test)
            methods = (["scratch"] + TRANSFER) if budget != 0 else sorted(UDA)
            for m in methods:
                uses_source = m in UDA or m == "joint"
                t = time.time()
                job = TrainJob("smallcnn", 10, m, _optim(epochs, args.steps, 64), seed,
                               init_state=None if m == "scratch" else src_state,
                               source=source if uses_source else None, labeled=labeled if budget != 0 else None,
                               unlabeled=pool if m in UDA else None)
                record(m, budget, _accuracy(run(job), test_loader), time.time() - t)
        t = time.time()
        full = TrainJob("smallcnn", 10, "scratch", _optim(epochs * 2, args.steps, 64), seed, labeled=target)
        record("train_on_target", None, _accuracy(run(full), test_loader), time.time() - t)
    wall = time.time() - t_all
    cols = ["all" if b is None else str(b) for b in budgets]
    Path(args.out).write_text(json.dumps({"results": results, "times": times, "seeds": seeds, "columns": cols,
                                          "wall_s": wall}, indent=1))
    _write(results, times, seeds, budgets, args, wall)


def _cell(vals):
    if not vals:
        return "–"
    return f"{np.mean(vals) * 100:.1f} ± {np.std(vals) * 100:.1f}" if len(vals) > 1 else f"{vals[0] * 100:.1f}"


def _write(results, times, seeds, budgets, args, wall):
    cols = ["all" if b is None else str(b) for b in budgets]
    cols += [] if "all" in cols else ["all"]  # the train-on-target ceiling
    order = ["source_only", "scratch"] + TRANSFER + ["train_on_target"]
    so = np.mean(results["source_only"]["0"])
    ceil = np.mean(results["train_on_target"]["all"])
    lines = ["## Transfer benchmark: synth_digits -> optdigits", "",
             f"`python -m bench.transfer{' --quick' if args.quick else ''}`: accuracy (%) on the fixed optdigits test "
             f"split, mean ± std over {len(seeds)} seed(s), by target labels per class. Method hyper-parameters are the "
             f"pipeline defaults, fixed in advance; {args.synth_per_class} synthetic images per class; {args.epochs if not args.quick else max(2, args.epochs // 2)} "
             f"epochs x {args.steps} steps (batch 64) on the target side. Unsupervised rows (0 labels) use the unlabeled "
             f"target training split; no test image is ever in the pool. "
             f"Total wall time {f'{wall / 60:.1f} min' if wall else 'not recorded'} on {machine()}.", "",
             "| method | " + " | ".join(cols) + " | s/run |", "|---" * (len(cols) + 2) + "|"]
    for m in order:
        if m in results:
            row = [_cell(results[m].get(c, [])) for c in cols]
            lines.append(f"| {m} | " + " | ".join(row) + f" | {np.mean(times[m]):.0f} |")
    lines += ["", f"Share of the source-only ({so * 100:.1f}) -> train-on-target ({ceil * 100:.1f}) gap recovered:", "",
              "| method | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for m in ["scratch"] + TRANSFER:
        if m in results:
            row = [f"{(np.mean(results[m][c]) - so) / (ceil - so) * 100:.0f} %" if c in results[m] else "–" for c in cols]
            lines.append(f"| {m} | " + " | ".join(row) + " |")
    lines += ["", "Gain over `scratch` (points, mean ± std of the per-seed difference):", "",
              "| method | " + " | ".join(c for c in cols if c != "0") + " |", "|---" * len(cols) + "|"]
    for m in TRANSFER:
        row = []
        for c in cols:
            if c == "0":
                continue
            a, b = results.get(m, {}).get(c), results.get("scratch", {}).get(c)
            row.append(_cell([x - y for x, y in zip(a, b)]) if a and b else "–")
        lines.append(f"| {m} | " + " | ".join(row) + " |")
    lines += ["", "![accuracy vs labels per class](transfer_benchmark.png)"]
    _plot(results, cols, order)
    print("\n".join(lines))
    print(f"wrote {write_section('transfer', chr(10).join(lines))}")


def _plot(results, cols, order):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = {c: (i, c) for i, c in enumerate(cols)}
    fig, ax = plt.subplots(figsize=(8, 5))
    for m in order:
        pts = [(xs[c][0], np.mean(results[m][c]) * 100) for c in cols if c in results.get(m, {})]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=m, linestyle="--" if m in ("source_only", "train_on_target") else "-")
    ax.set_xticks(range(len(cols)), cols)
    ax.set(xlabel="target labels per class", ylabel="test accuracy (%)", title="synth_digits -> optdigits")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(DOC.parent / "transfer_benchmark.png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
