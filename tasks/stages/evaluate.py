"""Stage ``evaluate``: test-set metrics, baselines comparison, DVC plots and a readable report.

Writes ``reports/metrics.json`` (flat DVC metrics), ``reports/per_class.csv`` and
``reports/predictions.csv`` (DVC plots), PNG figures and ``reports/report.md``. The metrics include
label-free validators (``val_free_*``, :mod:`tlcore.validators`) computed on the unlabeled target pool,
the scores a user without target labels can choose by; DEV also reads a sample of the source test split.
"""

from __future__ import annotations

import csv

import numpy as np

from tasks.modeling.candidate import choose
from tasks.modeling.checkpoints import load_checkpoint
from tasks.modeling.domains import load_domain, pool_sample, split_as_trained
from tasks.modeling.hardware import device_for, set_torch_threads
from tasks.modeling.model_input import spec_from_meta
from tasks.modeling.plan import budget_text, labels_per_class
from tasks.project.config import Params
from tasks.project.files import atomic_path, read_json, write_json
from tasks.project.report import confusion_matrix_png, pct, table, training_curves
from tasks.project.stage import say, stage_main

DEV_SOURCE_IMAGES = 512  # held-out source images DEV reads (one forward pass, a logistic regression)


def evaluate(params: Params) -> dict:
    import torch

    from tlcore import data, metrics
    from tlcore.engine import predict
    from tlcore.models import count_params

    set_torch_threads(params)
    device = device_for(params)
    rep_dir = params.path("reports")
    model, meta = load_checkpoint(params.path("models", "finetuned.pt"))
    classes = meta["classes"]
    pool, test_ds = load_domain(params, "target", meta["arch"])
    loader = data.make_loader(test_ds, params.evaluate.batch_size, train=False)
    logits, y = predict(model.to(device), loader, device)
    rep = metrics.classification_report(logits, y.numpy(), classes, params.evaluate.ece_bins)
    base = read_json(rep_dir / "baselines.json")
    free = label_free_scores(params, model, meta, pool, device)
    cpu_model = model.cpu().eval()
    example = torch.stack([test_ds[i][0] for i in range(min(64, len(test_ds)))])
    lat = metrics.latency_ms(cpu_model, example, iters=params.evaluate.latency_iters)
    ft = read_json(rep_dir / "finetune.json")
    # the gain is over scratch (same labels, no transfer); with no labels, over source_only (no adaptation)
    over = next((b for b in ("scratch", "source_only") if base[f"{b}_accuracy"] is not None), None)
    cand = choose(ft, base)  # on the validation images, never this test split (tasks/modeling/candidate.py)
    flat = {
        "accuracy": rep["accuracy"],
        "macro_f1": rep["macro_f1"],
        "ece": rep["ece"],
        "scratch_accuracy": base["scratch_accuracy"],
        "source_only_accuracy": base["source_only_accuracy"],
        "transfer_gain": rep["accuracy"] - base[f"{over}_accuracy"] if over else None,
        "gain_baseline": over,
        **lat,
        "throughput_ips": metrics.throughput(cpu_model, example),
        "params_m": count_params(cpu_model) / 1e6,
        "size_mb": metrics.model_size_mb(cpu_model),
        "test_images": len(test_ds),
        "strategy": ft["strategy"],  # the one that ran (finetune.strategy may be auto)
        "candidate": cand.strategy,  # what register registers: the transfer model or scratch
        **{f"val_free_{k}": v for k, v in free.items()},
    }
    write_json(rep_dir / "metrics.json", flat)
    _write_csv(rep_dir / "per_class.csv", rep["per_class"])
    _write_csv(
        rep_dir / "predictions.csv",
        [{"actual": classes[a], "predicted": classes[p]} for a, p in zip(y.tolist(), rep["predictions"])],
    )
    write_json(rep_dir / "evaluation.json", {k: v for k, v in rep.items() if k != "predictions"})
    fig_dir = rep_dir / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    pre = read_json(rep_dir / "pretrain.json")
    training_curves(
        {
            f"finetune ({ft['strategy']})": ft["history"],
            "scratch": base["scratch_history"],
            "pretrain (source)": pre["history"],
        },
        fig_dir / "training_curves.png",
    )
    confusion_matrix_png(
        rep["confusion_matrix"],
        classes,
        fig_dir / "confusion_matrix.png",
        f"{ft['strategy']} on target test (acc {rep['accuracy']:.3f})",
    )
    _write_report(params, flat, rep, ft, pre, cand)
    say(
        f"evaluate: accuracy {pct(flat['accuracy'])} (scratch {pct(flat['scratch_accuracy'])}, source-only "
        f"{pct(flat['source_only_accuracy'])}), transfer gain "
        + (f"{flat['transfer_gain'] * 100:+.1f} points over {over}" if over else "n/a (no baseline applies)")
    )
    return flat


def label_free_scores(params: Params, model, meta: dict, pool, device) -> dict:
    """:func:`tlcore.validators.scores` of ``model`` on the target training split with its labels unused (the
    unlabeled pool; a seeded sample of up to :data:`VALIDATOR_IMAGES`, as every label-free score reads it: SND
    compares every pair), and DEV on up to :data:`DEV_SOURCE_IMAGES` images of the source test split (held out
    from every training stage) when the model's classes are the source's."""
    from tlcore import data, transforms, validators

    spec = spec_from_meta(meta)  # as the model was trained: size, crop, channels, normalisation
    pool = pool.subset(pool_sample(np.arange(len(pool)), params.base.seed))
    pool.transform = transforms.build_transform(spec, train=False)
    batch = params.evaluate.batch_size
    feats, logits, _ = validators.features_and_logits(model, data.make_loader(pool, batch, train=False), device)
    src = split_as_trained(
        params.path("data", "source", "test"), meta, max_images=DEV_SOURCE_IMAGES, seed=params.base.seed
    )
    source = None
    if src.classes == meta["classes"] and len(src) >= 4:
        source = validators.features_and_logits(model, data.make_loader(src, batch, train=False), device)
    return validators.scores(logits, source, feats)


def _gain_line(flat: dict) -> str:
    over = flat["gain_baseline"]
    if over is None:
        return "**Transfer gain: n/a** (no target labels to train scratch on, and no shared label set for source-only)."
    label = {"scratch": "training from scratch", "source_only": "the source model without adaptation"}[over]
    line = f"**Transfer gain over {over}: {flat['transfer_gain'] * 100:+.2f} points.** "
    return line + (f"Negative transfer: this model loses to {label}." if flat["transfer_gain"] <= 0 else "")


def _candidate_line(cand) -> str:
    return (
        f"**Registration candidate: {cand.why}.** The run registers the better of the transfer model and scratch on "
        f"validation images held out of the target's training split (never this test split); the register stage's "
        f"gate then compares it with the champion and the baseline on the test images."
    )


def _check_lines(ft: dict) -> list[str]:
    """The 0-label adaptation check (tasks/modeling/strategy_choice.py), when the run had one."""
    check = (ft.get("selection") or {}).get("check")
    if not check:
        return []
    head = "**Adaptation probably failed.**" if check["failed"] else "**Adaptation check passed.**"
    return [f"{head} With no target labels: {check['why']}.", ""]


def _write_csv(path, rows: list[dict]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def _write_report(params: Params, flat: dict, rep: dict, ft: dict, pre: dict, cand) -> None:
    from tlcore.validators import HIGHER_IS_BETTER

    so = flat["source_only_accuracy"]
    lines = [
        "# Transfer report",
        "",
        f"Source `{params.data.source}` -> target `{params.data.target}`, backbone `{params.pretrain.backbone}`, "
        f"strategy `{ft['strategy']}`, target labels: {budget_text(labels_per_class(params))} "
        f"({ft['labeled']} labeled target images), seed {params.base.seed}.",
        "",
        "## Accuracy on the target test split",
        "",
        table(
            [
                {"model": f"transfer ({ft['strategy']})", "accuracy": flat["accuracy"], "macro_f1": flat["macro_f1"]},
                {"model": "scratch (same labels, no transfer)", "accuracy": flat["scratch_accuracy"]},
                {"model": "source only (no adaptation)", "accuracy": so},
            ],
            ["model", "accuracy", "macro_f1"],
        ),
        "",
        _gain_line(flat),
        "",
        _candidate_line(cand),
        "",
        *_check_lines(ft),
        f"Expected calibration error {flat['ece']:.4f}. Source model accuracy on its own test split: "
        f"{pct(pre.get('source_test_accuracy'))}.",
        "",
        "## Label-free validation (target pool, no labels used)",
        "",
        "What a user without target labels can judge this model by (`val_free_*` in metrics.json); each is "
        "comparable only between models scored on the same pool. None predicts accuracy on every task.",
        "",
        table(
            [
                {"validator": k, "score": flat[f"val_free_{k}"], "better": "higher" if up else "lower"}
                for k, up in HIGHER_IS_BETTER.items()
            ],
            ["validator", "score", "better"],
        ),
        "",
        "## Deployment figures (CPU)",
        "",
        table(
            [{k: flat[k] for k in ("latency_ms_p50", "latency_ms_p95", "throughput_ips", "params_m", "size_mb")}],
            ["latency_ms_p50", "latency_ms_p95", "throughput_ips", "params_m", "size_mb"],
        ),
        "",
        "## Training curves",
        "",
        "![training curves](figures/training_curves.png)",
        "",
        "## Confusion matrix",
        "",
        "![confusion matrix](figures/confusion_matrix.png)",
        "",
        "## Per class",
        "",
        table(rep["per_class"], ["class", "precision", "recall", "f1", "support"]),
        "",
        "Compression trade-offs: [compression.md](compression.md).",
        "",
    ]
    with atomic_path(params.path("reports", "report.md")) as tmp:
        tmp.write_text("\n".join(lines))


if __name__ == "__main__":
    stage_main(evaluate)
