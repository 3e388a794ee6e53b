"""Selection benchmark: how well label-free validators (and LogME) pick a model without target labels.

On every embedded domain pair (``tlcore.datasets.PAIRS``) and seed, one source model is pretrained, then a
pool of checkpoints is trained with no target labels: the unsupervised methods (dann, mcc, semi) x a grid of
learning rates. Each checkpoint is scored by every validator of :mod:`tlcore.validators` on the unlabeled
target pool (the target training split, labels unused; DEV also on a held-out tenth of the source, kept out
of every training run) and by LogME on its features with 5 target labels per class (not label-free: the
"few labels" reference). Its true accuracy is measured twice: on the pool with its labels (the quantity the
validators are compared with: Kendall tau over the pair's checkpoints, and the regret of each validator's
pick), and on the target test split (reported for the picks only). No choice in this file or in the
pipeline's defaults reads the test split; it is only reported.

Regret of a validator on one (pair, seed): accuracy of the oracle-best checkpoint minus that of the
checkpoint the validator picks. The table also gives the fixed rule (``semi`` at lr 3e-3: what
``finetune.strategy: auto`` would train without measuring) and ``source_only`` (no adaptation). Two uses
of a validator are scored, and ``auto`` means the best one for each (:func:`best_validator`): a search over
every method and learning rate (``tl tune``), and the choice between ``AUTO_CANDIDATES`` at the default
learning rate, which is what ``finetune.strategy: auto`` makes with no target labels (scored here on the
checkpoints after the full schedule; the stage scores after ``tune.epochs``).

    python -m bench.selection            # every pair, 3 seeds, 3 methods x 3 learning rates (about 55 min on 2 cores)
    python -m bench.selection --quick    # one pair, 1 seed, 2 methods x 2 lrs, short schedules (< 3 min); bench_out/
    python -m bench.selection --render   # rewrite the docs section from the saved results
"""

from __future__ import annotations

import argparse
import json
import time
from functools import partial
from pathlib import Path

import numpy as np

from bench.docs import DOC, QUICK_DIR, machine, write_section
from bench.transfer import optim_config
from tasks.project import measured
from tasks.project.files import atomic_path

METHODS = ["dann", "mcc", "semi"]
LRS = [1e-3, 3e-3, 1e-2]
DEFAULT = ("semi", 3e-3)  # finetune.strategy auto's rule with one shared label set, at the default finetune.lr
# with no target labels auto picks among these instead (tune.strategies' default) at that lr, by tune.validator
AUTO_CANDIDATES = ("semi", "mcc")
POOL_ONLY = measured.VALIDATORS  # need no source data: the ones tl tune, tl rank and the finetune stage can use
VALIDATORS = [*POOL_ONLY, "dev"]
SCORES = VALIDATORS + ["logme"]  # logme reads LOGME_LABELS labels per class: the few-labels reference
LOGME_LABELS = 5
SECTION = "selection"
TRUST = "selection-trust"  # the README's generated paragraph
README = DOC.parents[1] / "README.md"


def _score_checkpoint(model, pool, source_heldout, logme_idx, test_loader, batch: int = 256) -> dict:
    """Validators, LogME, pool accuracy and test accuracy of one trained model."""
    from tlcore import data, transferability, validators
    from tlcore.metrics import accuracy

    model.eval()
    feats, logits, y = validators.features_and_logits(model, data.make_loader(pool, batch, train=False))
    src = validators.features_and_logits(model, data.make_loader(source_heldout, batch, train=False))
    s = validators.scores(logits, src, feats)
    s["logme"] = transferability.logme(feats[logme_idx].numpy(), y[logme_idx].numpy(), 10)
    return {
        **s,
        "pool_accuracy": float((logits.argmax(1) == y).float().mean()),
        "test_accuracy": accuracy(model, test_loader),
    }


def run(args) -> dict:
    from tasks.modeling.train import TrainJob, job_streams, run_job
    from tlcore import data, datasets, models, transforms
    from tlcore.strategies import strategy_class

    spec = models.get_spec("smallcnn")
    eval_tf = transforms.build_transform(spec, train=False)
    pairs = [(s, t) for s, t, _ in datasets.PAIRS][: 1 if args.quick else None]
    seeds = list(range(1 if args.quick else args.seeds))
    methods, lrs = (["mcc", "semi"], [1e-3, 3e-3]) if args.quick else (METHODS, LRS)
    epochs, steps = (2, 10) if args.quick else (args.epochs, args.steps)
    pre_epochs = 3 if args.quick else 6
    settings = {
        "quick": args.quick,
        "epochs": epochs,
        "steps": steps,
        "pretrain_epochs": pre_epochs,
        "synth_per_class": args.synth_per_class,
        "methods": methods,
        "lrs": lrs,
        "seeds": seeds,
    }
    out = Path(args.out)
    saved = json.loads(out.read_text()) if args.resume and out.is_file() else {}
    if saved and saved["settings"] != settings:
        raise SystemExit(f"--resume: {out} was made with {saved['settings']}, not {settings}")
    # rows[pair][seed] = {"source_only": {...}, "checkpoints": [{"method", "lr", scores...}]}; saved after each
    rows: dict = saved.get("rows", {})
    t0, wall0 = time.time(), saved.get("wall_s", 0.0)

    def save():
        state = {"settings": settings, "rows": rows, "wall_s": wall0 + time.time() - t0}
        out.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(out) as tmp:
            tmp.write_text(json.dumps(state, indent=1))
        return state

    def train(job):
        return run_job(job, "cpu", log=None)[0]

    for source, target in pairs:
        key = f"{source}->{target}"
        for seed in seeds:
            cell = rows.setdefault(key, {}).setdefault(str(seed), {"checkpoints": []})
            if "source_only" in cell and {(c["method"], c["lr"]) for c in cell["checkpoints"]} >= {
                (m, lr) for m in methods for lr in lrs
            }:
                continue  # kept by --resume: nothing left to train for this pair and seed
            src_all, pool, test = datasets.domain_task(spec, source, target, args.synth_per_class, seed=seed)
            perm = np.random.default_rng(seed).permutation(len(src_all))
            cut = len(src_all) // 10  # a tenth of the source held out of every run, for DEV
            src_ds, src_held = src_all.subset(perm[cut:]), src_all.subset(perm[:cut], transform=eval_tf)
            pool_eval = pool.subset(np.arange(len(pool)), transform=eval_tf)
            logme_idx = data.label_budget_split(pool.targets.numpy(), LOGME_LABELS, seed).labeled
            test_loader = data.make_loader(test, 512, train=False)
            score = partial(
                _score_checkpoint, pool=pool_eval, source_heldout=src_held, logme_idx=logme_idx, test_loader=test_loader
            )
            print(f"== {key} seed {seed}: pretraining the source model", flush=True)
            src = train(TrainJob("smallcnn", 10, "scratch", optim_config(pre_epochs, None, 128), seed, labeled=src_ds))
            if "source_only" not in cell:
                cell["source_only"] = score(src)
            state = {k: v.clone() for k, v in src.state_dict().items()}
            done = {(c["method"], c["lr"]) for c in cell["checkpoints"]}
            for m in methods:
                for lr in lrs:
                    if (m, lr) in done:
                        continue
                    t = time.time()
                    cls = strategy_class(m)
                    job = TrainJob(
                        "smallcnn",
                        10,
                        m,
                        optim_config(epochs, steps, 64, lr=lr),
                        seed,
                        init_state=state,
                        **job_streams(cls, source=src_ds, unlabeled=pool),
                    )
                    r = {"method": m, "lr": lr, **score(train(job)), "seconds": time.time() - t}
                    cell["checkpoints"].append(r)
                    print(
                        f"  {m:<5} lr={lr:<6g} pool acc {r['pool_accuracy']:.4f} test acc {r['test_accuracy']:.4f} "
                        f"snd {r['snd']:.3f} ({r['seconds']:.0f} s)",
                        flush=True,
                    )
                    save()
            save()
    return save()


def summarise(state: dict) -> dict:
    """Kendall tau per pair and score, and per-(pair, seed) picks: ``{"tau": {pair: {score: tau}}, "regret": ...}``."""
    from scipy.stats import kendalltau

    from tlcore.validators import HIGHER_IS_BETTER

    better = {**HIGHER_IS_BETTER, "logme": True}
    tau, picks = {}, {}
    for pair, by_seed in state["rows"].items():
        cks = [c for cell in by_seed.values() for c in cell["checkpoints"]]
        acc = [c["pool_accuracy"] for c in cks]
        tau[pair] = {}
        for s in SCORES:
            vals = [c[s] for c in cks]
            ok = [i for i, v in enumerate(vals) if v is not None and np.isfinite(v)]
            t = (
                kendalltau([vals[i] if better[s] else -vals[i] for i in ok], [acc[i] for i in ok]).statistic
                if len(ok) > 2
                else None
            )
            tau[pair][s] = None if t is None or not np.isfinite(t) else float(t)
        picks[pair] = []
        for seed, cell in by_seed.items():
            c = cell["checkpoints"]
            if not c:
                continue
            row = {"seed": seed, "oracle": max(c, key=lambda x: x["pool_accuracy"]), "source_only": cell["source_only"]}
            row["default"] = next((x for x in c if (x["method"], x["lr"]) == DEFAULT), None)
            # what finetune.strategy auto trains with no target labels, were this validator tune.validator
            auto = [x for x in c if x["method"] in AUTO_CANDIDATES and x["lr"] == DEFAULT[1]]
            for v in POOL_ONLY:
                cand = [x for x in auto if x[v] is not None and np.isfinite(x[v])]
                row[f"auto_{v}"] = (max if better[v] else min)(cand, key=lambda x: x[v]) if cand else None
            for s in SCORES:
                cand = [x for x in c if x[s] is not None and np.isfinite(x[s])]
                row[s] = (max if better[s] else min)(cand, key=lambda x: x[s]) if cand else None
            picks[pair].append(row)
    return {"tau": tau, "picks": picks}


def mean_regrets(s: dict) -> dict[str, float]:
    """Mean over pairs of (oracle - pick) pool accuracy in points, per score and for default / source_only;
    ``s`` is :func:`summarise`'s result."""
    regret: dict[str, list[float]] = {}
    for rows in s["picks"].values():
        oracle = _mean(rows, "oracle", "pool_accuracy")
        for who in ["default", "source_only"] + SCORES + [f"auto_{v}" for v in POOL_ONLY]:
            a = _mean(rows, who, "pool_accuracy")
            if a is not None:
                regret.setdefault(who, []).append((oracle - a) * 100)
    return {k: float(np.mean(v)) for k, v in regret.items()}


def best_validator(state: dict, use: str = "search", among=POOL_ONLY) -> str:
    """Of ``among``, the validator with the lowest mean regret for ``use`` (ties: the higher mean Kendall tau):
    ``search`` picks among every checkpoint (tasks.project.measured.AUTO_VALIDATOR: ``tl tune``, ``tl rank``),
    ``strategy``
    among ``AUTO_CANDIDATES`` at the default lr (tasks.project.measured.AUTO_STRATEGY_VALIDATOR: finetune.strategy
    auto)."""
    s = summarise(state)
    regret = mean_regrets(s)
    key = (lambda v: v) if use == "search" else (lambda v: f"auto_{v}")
    tau = {v: np.mean([t[v] for t in s["tau"].values() if t[v] is not None] or [-1.0]) for v in among}
    return min((v for v in among if key(v) in regret), key=lambda v: (round(regret[key(v)], 6), -tau[v]))


def _mean(rows, who, metric):
    vals = [r[who][metric] for r in rows if r.get(who) is not None]
    return float(np.mean(vals)) if vals else None


def render(state: dict, dest: Path) -> str:
    s = summarise(state)
    st = state["settings"]
    f = lambda v: "–" if v is None else f"{v:+.2f}"
    pct = lambda v: "–" if v is None else f"{v * 100:.1f}"
    pairs = list(s["tau"])
    cmd = "python -m bench.selection" + (" --quick" if st["quick"] else "")
    lines = [
        "## Selection without target labels",
        "",
        f"`{cmd}`: per pair, {len(st['seeds'])} seed(s) x methods {', '.join(st['methods'])} x learning rates "
        f"{', '.join(f'{x:g}' for x in st['lrs'])}, no target labels, {st['epochs']} epochs x {st['steps']} "
        f"steps each from a source model pretrained for {st['pretrain_epochs']} epochs. Validators score each "
        f"checkpoint on the unlabeled target pool (the target training split, labels unused); LogME uses "
        f'{LOGME_LABELS} labels per class of that pool (a few-labels reference, not label-free). "Accuracy" is '
        f"on that pool with its labels (never used to train); the target test split is only reported, for the "
        f"picks. Wall time {state['wall_s'] / 60:.1f} min on {machine()}.",
        "",
        "Kendall τ between each score (signed so that larger should mean better) and accuracy, over a pair's "
        "checkpoints; a negative τ means the score points the wrong way there:",
        "",
        "| score | " + " | ".join(pairs) + " | mean |",
        "|---" * (len(pairs) + 2) + "|",
    ]
    for sc in SCORES:
        vals = [s["tau"][p][sc] for p in pairs]
        ok = [v for v in vals if v is not None]
        flag = " (fails: τ < 0 somewhere)" if any(v < 0 for v in ok) else ""
        lines.append(f"| {sc}{flag} | " + " | ".join(f(v) for v in vals) + f" | {f(np.mean(ok) if ok else None)} |")
    lines += [
        "",
        "Pool accuracy (%) of the checkpoint each picks, mean over seeds, and its regret (oracle minus pick, "
        "points); test accuracy of the pick in brackets:",
        "",
        "| pair | oracle | default (semi, 3e-3) | source_only | " + " | ".join(SCORES) + " |",
        "|---" * (len(SCORES) + 4) + "|",
    ]
    for p in pairs:
        rows = s["picks"][p]
        oracle = _mean(rows, "oracle", "pool_accuracy")
        cells = []
        for who in ["default", "source_only"] + SCORES:
            a, t = _mean(rows, who, "pool_accuracy"), _mean(rows, who, "test_accuracy")
            cells.append("–" if a is None else f"{pct(a)} ({(oracle - a) * 100:.1f}) [{pct(t)}]")
        lines.append(
            f"| {p} | {pct(oracle)} [{pct(_mean(rows, 'oracle', 'test_accuracy'))}] | " + " | ".join(cells) + " |"
        )
    mean_regret = mean_regrets(s)
    auto, auto_strategy = best_validator(state), best_validator(state, "strategy")
    shown = {k: v for k, v in mean_regret.items() if not k.startswith("auto_")}
    lines += [
        "",
        "Mean regret (points): "
        + ", ".join(f"{k} {v:.2f}" for k, v in sorted(shown.items(), key=lambda kv: kv[1]))
        + ".",
        f"`auto` for a search (`tune.validator` in `tl tune`, `tl rank --validator`) is **{auto}**, the "
        f"validator needing no source data ({', '.join(POOL_ONLY)}) with the lowest mean regret above "
        f"(`tasks.project.measured.AUTO_VALIDATOR`).",
        f"`finetune.strategy: auto` with no target labels picks the better of {' and '.join(AUTO_CANDIDATES)} at lr "
        f"{DEFAULT[1]:g} (scored here after the full {st['epochs']} epochs; the stage scores after `tune.epochs`). "
        f"Mean regret of that choice by each validator: "
        + ", ".join(f"{v} {mean_regret[f'auto_{v}']:.2f}" for v in POOL_ONLY)
        + f"; the rule without measuring (semi) {mean_regret['default']:.2f}. `auto` there is **{auto_strategy}** "
        f"(`tasks.project.measured.AUTO_STRATEGY_VALIDATOR`). A test holds both constants to these results.",
    ]
    text = "\n".join(lines)
    write_section(SECTION, text, dest / DOC.name)
    write_section(TRUST, trust(state), dest / "README.md" if dest != DOC.parent else README)
    return text


def trust(state: dict) -> str:
    """The README's paragraph on how far to trust the label-free choices, from the measured results."""
    s = summarise(state)
    auto, auto_strategy = best_validator(state), best_validator(state, "strategy")
    regret = mean_regrets(s)
    pairs = list(s["tau"])
    taus = {p: s["tau"][p][auto] for p in pairs}
    per_pair = {}
    for p in pairs:
        rows = s["picks"][p]
        per_pair[p] = (
            (_mean(rows, "oracle", "pool_accuracy") - _mean(rows, auto, "pool_accuracy")) * 100,
            (_mean(rows, auto, "pool_accuracy") - _mean(rows, "source_only", "pool_accuracy")) * 100,
        )
    worst = max(per_pair, key=lambda p: per_pair[p][0])
    below = [p for p in pairs if per_pair[p][1] < 0]
    negative = [p for p in pairs if taus[p] is not None and taus[p] < 0]
    rows = [r for p in pairs for r in s["picks"][p] if r.get(f"auto_{auto_strategy}") and r.get("default")]
    differ = sum(r[f"auto_{auto_strategy}"]["method"] != DEFAULT[0] for r in rows)
    a, d = regret[f"auto_{auto_strategy}"], regret["default"]
    st = state["settings"]
    search = (
        f"within the goal of 1 point of the oracle on average{'' if below else ', never below `source_only`'}"
        if regret[auto] <= 1
        else "outside the goal of 1 point of the oracle on average"
    )
    return (
        f"How far to trust it (written by `python -m bench.selection` from its measured results; details in "
        f"[docs/benchmarks.md](docs/benchmarks.md#selection-without-target-labels)), over {len(st['seeds'])} "
        f"seed(s) x {len(st['methods'])} methods x {len(st['lrs'])} learning rates on each of the {len(pairs)} "
        f"embedded pairs. **Search** (`tl tune` with no validation labels): `auto` is **{auto}**; its Kendall τ "
        "with accuracy is "
        + ", ".join(f"{'–' if taus[p] is None else f'{taus[p]:+.2f}'} ({p})" for p in pairs)
        + f", and the checkpoint it picks is {regret[auto]:.2f} points below the best one on average (worst "
        f"{per_pair[worst][0]:.1f}, on {worst}): {search}"
        + (f"; below `source_only` on {', '.join(below)}" if below else "")
        + ". "
        + (
            f"Its τ is negative on {', '.join(negative)}: there it ranks models the wrong way round. "
            if negative
            else ""
        )
        + f"That is no better than the fixed rule (semi at lr {DEFAULT[1]:g}, {d:.2f} points), so on data like "
        f"these a search buys little; on data unlike them the validator is the only label-free evidence there is. "
        if regret[auto] >= d
        else f"That beats the fixed rule (semi at lr {DEFAULT[1]:g}, {d:.2f} points). "
    ) + (
        f"**`finetune.strategy: auto` with no target labels** (the better of {' and '.join(AUTO_CANDIDATES)} at lr "
        f"{DEFAULT[1]:g}): `auto` is **{auto_strategy}**; its choice is {a:.2f} points below the best checkpoint "
        f"on average against {d:.2f} for the rule, and differs from the rule in {differ} of {len(rows)} "
        f"(pair, seed) cases"
        + (
            " — a small but measured gain. "
            if d - a >= 0.1
            else ", a difference within 0.1 points: no gain to speak of. "
        )
        + "`tl rank`'s label-free ordering of source models borrows the search validator, which was measured on "
        "adapted checkpoints, not on candidate source models: an extrapolation. These are digit-like domains; on "
        "your data, a validator is unproven until you check it against a few labels "
        "(`data.val_per_class`), which then decide instead."
    )


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one pair, 1 seed, 2 methods x 2 lrs, short schedules")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--synth-per-class", type=int, default=500)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument(
        "--out", default=None, help="results JSON (default docs/selection_benchmark.json; bench_out/ with --quick)"
    )
    ap.add_argument("--render", action="store_true", help="only rewrite the docs section from the saved results")
    ap.add_argument("--resume", action="store_true", help="keep the checkpoints already scored (same settings)")
    args = ap.parse_args(argv)
    if args.quick:
        args.synth_per_class = min(args.synth_per_class, 100)
    dest = QUICK_DIR if args.quick else DOC.parent
    args.out = args.out or str(dest / "selection_benchmark.json")
    if args.render:
        state = json.loads(Path(args.out).read_text())
        dest = QUICK_DIR if state["settings"]["quick"] else DOC.parent
    else:
        state = run(args)
    print(render(state, dest))


if __name__ == "__main__":
    main()
