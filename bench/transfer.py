"""Transfer benchmark: what each method buys over training from scratch, by target label budget.

One grid per embedded domain pair (``tlcore.datasets.PAIRS``: synth_digits -> optdigits, the reverse,
and optdigits -> its rotated and its noisy copy), each on the target's fixed test split, never used for
any choice. Rows are methods, columns labels per class, cells mean ± std over seeds. Hyper-parameters
are the pipeline's defaults, fixed in advance and the same for every pair (no tuning on a test split).
Writes one section of docs/benchmarks.md and one plot per pair (docs/transfer_benchmark.png and
results docs/transfer_benchmark.json for the default pair; ..._SOURCE-TARGET.* for the others).

    python -m bench.transfer                                    # every pair, full grid, 3 seeds
    python -m bench.transfer --pair optdigits:optdigits_noisy   # one pair
    python -m bench.transfer --quick                            # smoke grid: 1 seed, budgets 0/1/10
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from bench.docs import DOC, QUICK_DIR, machine, write_section
from tasks.project.files import atomic_path

TRANSFER = ["linear_probe", "finetune", "gradual_unfreeze", "joint", "dann", "mcc", "semi"]
UDA = {"dann", "mcc", "semi"}
BUDGETS = [0, 1, 2, 3, 5, 10, None]
DEFAULT_PAIR = ("synth_digits", "optdigits")
SEEDS = 3
README = DOC.parents[1] / "README.md"
README_SECTION = "transfer-summary"  # the README's generated quote of every pair's grid


def pair_files(source: str, target: str, dest: Path) -> tuple[Path, Path, str]:
    """(results JSON, plot, docs section name) of a pair; the default pair keeps its original names."""
    stem = "transfer_benchmark" if (source, target) == DEFAULT_PAIR else f"transfer_benchmark_{source}-{target}"
    section = "transfer" if (source, target) == DEFAULT_PAIR else f"transfer-{source}-{target}"
    return dest / f"{stem}.json", dest / f"{stem}.png", section


def _pairs(given: list[str]) -> list[tuple[str, str]]:
    from tlcore.datasets import EMBEDDED, PAIRS

    if not given:
        return [(s, t) for s, t, _ in PAIRS]
    out = []
    for g in given:
        s, _, t = g.partition(":")
        if s not in EMBEDDED or t not in EMBEDDED:
            raise SystemExit(f"--pair {g!r}: give SOURCE:TARGET, each one of {', '.join(EMBEDDED)}")
        out.append((s, t))
    return out


def optim_config(epochs: int, steps: int | None, batch: int, lr: float = 3e-3, precision: str = "auto"):
    from tasks.project.config import Optim

    return Optim(epochs=epochs, steps_per_epoch=steps, batch_size=batch, lr=lr, weight_decay=5e-4, precision=precision)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1 seed, budgets 0/1/10, shorter schedules")
    ap.add_argument("--seeds", type=int, default=SEEDS)
    ap.add_argument("--synth-per-class", type=int, default=500)
    ap.add_argument("--epochs", type=int, default=8, help="target-side epochs (x --steps steps)")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument(
        "--precision",
        default="auto",
        choices=["auto", "bf16", "fp32"],
        help="training precision (auto: bf16 where the CPU has native bf16)",
    )
    ap.add_argument(
        "--pair",
        action="append",
        default=[],
        metavar="SOURCE:TARGET",
        help="an embedded domain pair (repeatable; default: every pair in tlcore.datasets.PAIRS)",
    )
    ap.add_argument(
        "--out",
        default=None,
        help="results JSON, with one --pair (default docs/transfer_benchmark"
        "[_SOURCE-TARGET].json; bench_out/ with --quick)",
    )
    ap.add_argument("--render", action="store_true", help="only rewrite the docs from the saved results")
    ap.add_argument("--resume", action="store_true", help="keep the cells already saved (same settings)")
    ap.add_argument(
        "--columns",
        default=None,
        metavar="0,all",
        help="run only these label-budget columns now (comma-separated; the others keep what --resume kept and "
        "show n= where they have fewer seeds)",
    )
    args = ap.parse_args(argv)
    pairs = _pairs(args.pair)
    if args.out and len(pairs) > 1:
        raise SystemExit("--out names one results file: give one --pair with it")
    # a --quick smoke grid goes to bench_out/, never over the measured results in docs/
    dest = QUICK_DIR if args.quick else DOC.parent
    for source, target in pairs:
        out = Path(args.out) if args.out else pair_files(source, target, dest)[0]
        if args.render:
            if not out.is_file():
                print(f"no saved results for {source} -> {target} ({out}); skipped")
                continue
            saved = json.loads(out.read_text())
            budgets = [None if c == "all" else int(c) for c in saved["columns"]]
            where = QUICK_DIR if saved["settings"]["quick"] else DOC.parent
            _write(
                saved["results"],
                saved["times"],
                saved["seeds"],
                budgets,
                saved["settings"],
                saved.get("wall_s"),
                where,
                tuple(saved.get("pair", DEFAULT_PAIR)),
            )
        else:
            _run_pair(args, source, target, out, dest)


def _run_pair(args, source: str, target: str, out: Path, dest: Path) -> None:
    """The grid of one pair, saved to ``out`` after every cell; then its docs section."""
    import torch

    from tasks.modeling.train import TrainJob, job_streams, run_job
    from tlcore import data, datasets, models
    from tlcore.metrics import accuracy
    from tlcore.precision import precision_for_device
    from tlcore.strategies import strategy_class

    torch.set_num_threads(max(1, torch.get_num_threads()))
    seeds = list(range(1 if args.quick else args.seeds))
    budgets = [0, 1, 10] if args.quick else BUDGETS
    epochs = max(2, args.epochs // 2) if args.quick else args.epochs
    spec = models.get_spec("smallcnn")
    cols = ["all" if b is None else str(b) for b in budgets]
    settings = {
        "quick": args.quick,
        "epochs": epochs,
        "steps": args.steps,
        "synth_per_class": args.synth_per_class,
        "precision": precision_for_device(args.precision, "cpu"),
    }
    saved = json.loads(out.read_text()) if args.resume and out.exists() else {}
    if saved and (saved.get("settings") != settings or tuple(saved.get("pair", DEFAULT_PAIR)) != (source, target)):
        raise SystemExit(
            f"--resume: {out} was made with {saved.get('settings')} for {saved.get('pair', DEFAULT_PAIR)}, "
            f"not {settings} for {[source, target]}"
        )
    print(f"== {source} -> {target}", flush=True)
    # results[method][column][seed] = accuracy; saved after every run, so a stopped grid keeps its cells
    results: dict[str, dict[str, dict[str, float]]] = saved.get("results", {})
    times: dict[str, list[float]] = saved.get("times", {})
    t_all, wall0 = time.time(), saved.get("wall_s", 0.0)

    def save():
        state = {
            "settings": settings,
            "pair": [source, target],
            "results": results,
            "times": times,
            "seeds": seeds,
            "columns": cols,
            "wall_s": wall0 + time.time() - t_all,
        }
        out.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(out) as tmp:
            tmp.write_text(json.dumps(state, indent=1))
        return state

    def done(method, col, seed):
        return str(seed) in results.get(method, {}).get(col, {})

    def record(method, col, seed, acc, secs):
        results.setdefault(method, {}).setdefault(col, {})[str(seed)] = acc
        times.setdefault(method, []).append(secs)
        print(f"  seed {seed} {method:<17} labels/class={col:<4} acc={acc:.4f} ({secs:.0f} s)", flush=True)
        save()

    def run(job):
        return run_job(job, "cpu", log=None)[0]

    # columns outer, seeds inner: every finished column has all its seeds
    tasks_ = {}
    for seed in seeds:
        src_ds, tgt_ds, test = datasets.domain_task(spec, source, target, args.synth_per_class, seed=seed)
        test_loader = data.make_loader(test, 512, train=False)
        print(f"seed {seed}: pretraining the source model", flush=True)
        t = time.time()
        src = run(
            TrainJob(
                "smallcnn", 10, "scratch", optim_config(6, None, 128, precision=args.precision), seed, labeled=src_ds
            )
        )
        if not done("source_only", "0", seed):
            record("source_only", "0", seed, accuracy(src, test_loader), time.time() - t)
        tasks_[seed] = (src_ds, tgt_ds, test_loader, {k: v.clone() for k, v in src.state_dict().items()})
    wanted = set(args.columns.split(",")) if args.columns else set(cols)
    if wanted - set(cols):
        raise SystemExit(f"--columns {args.columns}: choose from {','.join(cols)}")
    for budget, col in zip(budgets, cols):
        if col not in wanted:
            continue
        methods = (["scratch"] + TRANSFER) if budget != 0 else sorted(UDA)
        for seed in seeds:
            src_ds, tgt_ds, test_loader, src_state = tasks_[seed]
            split = data.label_budget_split(tgt_ds.targets.numpy(), budget, seed)
            # the unlabeled pool: the whole target training split (no validation hold-out), labels unused; never test
            labeled, pool = tgt_ds.subset(split.labeled), tgt_ds.subset(split.unlabeled)
            for m in methods:
                if done(m, col, seed):
                    continue
                t = time.time()
                cls = strategy_class(m)
                job = TrainJob(
                    "smallcnn",
                    10,
                    m,
                    optim_config(epochs, args.steps, 64, precision=args.precision),
                    seed,
                    init_state=src_state if cls.transfers else None,
                    **job_streams(cls, source=src_ds, labeled=labeled if budget != 0 else None, unlabeled=pool),
                )
                record(m, col, seed, accuracy(run(job), test_loader), time.time() - t)
            if budget is None and not done("train_on_target", "all", seed):
                t = time.time()
                full = TrainJob(
                    "smallcnn",
                    10,
                    "scratch",
                    optim_config(epochs * 2, args.steps, 64, precision=args.precision),
                    seed,
                    labeled=tgt_ds,
                )
                record("train_on_target", "all", seed, accuracy(run(full), test_loader), time.time() - t)
    state = save()
    _write(results, times, seeds, budgets, settings, state["wall_s"], dest, (source, target))


def _vals(cell: dict | list | None) -> list[float]:
    return list(cell.values()) if isinstance(cell, dict) else list(cell or [])


def _cell(vals, n_seeds: int = 0):
    vals = _vals(vals)
    if not vals:
        return "–"
    txt = f"{np.mean(vals) * 100:.1f} ± {np.std(vals) * 100:.1f}" if len(vals) > 1 else f"{vals[0] * 100:.1f}"
    return txt + (f" (n={len(vals)})" if n_seeds and len(vals) < n_seeds else "")


def _diff(a, b) -> list[float]:
    """Per-seed differences of two cells (matched by seed)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [a[k] - b[k] for k in a if k in b]
    return [x - y for x, y in zip(_vals(a), _vals(b))]


def _complete(results, cols, n: int) -> bool:
    """Whether every cell of the grid has its ``n`` seeds (a grid stopped early and kept with --resume has not)."""
    return all(
        len(_vals(results.get(m, {}).get(c))) >= n for m in ["scratch"] + TRANSFER for c in cols if c != "0" or m in UDA
    )


def _write(results, times, seeds, budgets, settings, wall, dest: Path = DOC.parent, pair=DEFAULT_PAIR):
    from tlcore.datasets import PAIRS

    source, target = pair
    _, plot, section = pair_files(source, target, dest)
    shift = next((k for s, t, k in PAIRS if (s, t) == (source, target)), "")
    cols = ["all" if b is None else str(b) for b in budgets]
    cols += [] if "all" in cols else ["all"]  # the train-on-target ceiling
    order = ["source_only", "scratch"] + TRANSFER + ["train_on_target"]
    n = len(seeds)
    so = np.mean(_vals(results["source_only"]["0"]))
    complete = _complete(results, cols, n)
    ceil_vals = _vals(results.get("train_on_target", {}).get("all"))
    cmd = f"python -m bench.transfer --pair {source}:{target}" + (
        " --quick" if settings["quick"] else f" --seeds {n}" if n != SEEDS else ""
    )
    synth = f"{settings['synth_per_class']} synthetic images per class; " if "synth_digits" in pair else ""
    lines = [
        f"## Transfer benchmark: {source} -> {target}",
        "",
        *([f"Shift: {shift}.", ""] if shift else []),
        f"`{cmd}`: accuracy (%) on the fixed {target} test split, mean ± std over {n} seed(s) "
        f"(`n=` marks a cell with fewer, from a grid stopped early and kept with `--resume`), by target labels per "
        f"class. Method hyper-parameters are the pipeline defaults, fixed in advance and the same for every pair; "
        f"{synth}{settings['epochs']} epochs x {settings['steps']} steps (batch 64) on the "
        f"target side; {settings.get('precision', 'fp32')} training (autocast; `--precision`). The unlabeled pool is "
        f"the target training split (labels unused); no test image is ever in it. "
        f"Wall time {'' if complete else 'so far '}{wall / 60:.1f} min on {machine()}; `s/run` is the mean wall "
        f"clock per run (training and the test pass), so it includes whatever else the machine ran at the time.",
        "",
        "| method | " + " | ".join(cols) + " | s/run |",
        "|---" * (len(cols) + 2) + "|",
    ]
    for m in order:
        if m in results:
            row = [_cell(results[m].get(c), n) for c in cols]
            lines.append(f"| {m} | " + " | ".join(row) + f" | {np.mean(times[m]):.0f} |")
    if ceil_vals:
        ceil = np.mean(ceil_vals)
        lines += [
            "",
            f"Share of the source-only ({so * 100:.1f}) -> train-on-target ({ceil * 100:.1f}) gap recovered:",
            "",
            "| method | " + " | ".join(cols) + " |",
            "|---" * (len(cols) + 1) + "|",
        ]
        for m in ["scratch"] + TRANSFER:
            if m in results:
                row = [
                    f"{(np.mean(_vals(results[m][c])) - so) / (ceil - so) * 100:.0f} %" if c in results[m] else "–"
                    for c in cols
                ]
                lines.append(f"| {m} | " + " | ".join(row) + " |")
    else:
        lines += [
            "",
            "The train-on-target ceiling (column `all`) was not reached in this run, so the gap-recovered "
            "table is omitted.",
        ]
    lines += [
        "",
        "Gain over `scratch` (points, mean ± std of the per-seed difference):",
        "",
        "| method | " + " | ".join(c for c in cols if c != "0") + " |",
        "|---" * len(cols) + "|",
    ]
    for m in TRANSFER:
        row = []
        for c in cols:
            if c == "0":
                continue
            a, b = results.get(m, {}).get(c), results.get("scratch", {}).get(c)
            row.append(_cell(_diff(a, b), n) if a and b else "–")
        lines.append(f"| {m} | " + " | ".join(row) + " |")
    best = []
    for c in cols:
        cands = [(np.mean(_vals(results[m][c])), m) for m in ["scratch"] + TRANSFER if c in results.get(m, {})]
        if cands:
            acc, m = max(cands)
            best.append(f"{c} → `{m}` {acc * 100:.1f}")
    lines += [
        "",
        "Best method per column: " + ", ".join(best) + ".",
        "",
        f"![accuracy vs labels per class, {source} -> {target}]({plot.name})",
    ]
    _plot(results, cols, order, plot, f"{source} -> {target}")
    print("\n".join(lines))
    print(f"wrote {write_section(section, chr(10).join(lines), dest / DOC.name)}")
    readme = README if dest == DOC.parent else dest / README.name
    print(f"wrote {write_section(README_SECTION, summary(dest), readme)}")


def summary(dest: Path = DOC.parent) -> str:
    """One row per pair with saved results in ``dest``: the README's quote of every transfer grid."""
    from tlcore.datasets import PAIRS

    def best(results, col, methods):
        cands = [(np.mean(_vals(results[m][col])), m) for m in methods if col in results.get(m, {})]
        return max(cands) if cands else None

    def cell(b):
        return "–" if b is None else f"{b[0] * 100:.1f} `{b[1]}`"

    def single(results, m, col):
        v = _vals(results.get(m, {}).get(col))
        return f"{np.mean(v) * 100:.1f}" if v else "–"

    rows = []
    for source, target, shift in PAIRS:
        out = pair_files(source, target, dest)[0]
        if not out.is_file():
            rows.append(f"| {source} -> {target} | {shift} | not run yet | | | | | |")
            continue
        saved = json.loads(out.read_text())
        r, n = saved["results"], len(saved["seeds"])
        seeds = str(n) if _complete(r, saved["columns"], n) else f"{n} (grid unfinished)"
        rows.append(
            f"| {source} -> {target} | {shift} | {seeds} | {single(r, 'source_only', '0')} | "
            f"{cell(best(r, '0', sorted(UDA)))} | {single(r, 'scratch', '1')} / {cell(best(r, '1', TRANSFER))} | "
            f"{single(r, 'scratch', '10')} / {cell(best(r, '10', TRANSFER))} | {single(r, 'train_on_target', 'all')} |"
        )
    return "\n".join(
        [
            "Test accuracy (%, mean over seeds) on each embedded pair, from the saved grids (written by "
            "`python -m bench.transfer`; full tables in docs/benchmarks.md). Columns: no adaptation; the best "
            "method with no target labels; `scratch` / the best transfer method with 1 and with 10 labels "
            "per class; training on every target label:",
            "",
            "| pair | shift | seeds | source_only | 0 labels: best | 1 label: scratch / best | "
            "10 labels: scratch / best | train_on_target |",
            "|---" * 8 + "|",
            *rows,
        ]
    )


def _plot(results, cols, order, path: Path, title: str = "synth_digits -> optdigits"):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for m, style in (("source_only", ":"), ("train_on_target", "--")):  # references: horizontal lines
        vals = [v for cell in results.get(m, {}).values() for v in _vals(cell)]
        if vals:
            ax.axhline(
                np.mean(vals) * 100,
                color="grey",
                linestyle=style,
                linewidth=1.2,
                label=f"{m} ({np.mean(vals) * 100:.1f})",
            )
    for m in order:
        if m in ("source_only", "train_on_target"):
            continue
        pts = [
            (i, np.mean(_vals(results[m][c])) * 100, np.std(_vals(results[m][c])) * 100)
            for i, c in enumerate(cols)
            if c in results.get(m, {})
        ]
        if pts:
            x, y, e = zip(*pts)
            ax.errorbar(x, y, yerr=e, marker="o", capsize=3, label=m)
    ax.set_xticks(range(len(cols)), cols)
    ax.set(xlabel="target labels per class", ylabel="test accuracy (%), mean ± std over seeds", title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
