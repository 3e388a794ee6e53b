"""Stage ``compress``: pruning, int8 quantisation and distillation of the fine-tuned model.

Writes ``reports/compress.json`` (DVC metrics: size, latency, accuracy per variant),
``reports/compression.md`` and ``models/compressed/`` (the distilled student).
"""

from __future__ import annotations

from tasks.modeling.checkpoints import load_checkpoint, save_checkpoint
from tasks.modeling.domains import load_domain
from tasks.modeling.hardware import device_for, loader_workers, local_cpus, resolve_precision, set_torch_threads
from tasks.modeling.model_input import spec_from_meta
from tasks.modeling.train import target_splits
from tasks.project.config import Params
from tasks.project.console import EpochLine
from tasks.project.files import atomic_path, write_json
from tasks.project.report import pct, table
from tasks.project.stage import say, stage_main


def measure_variant(name: str, model, test_loader, example, iters: int, extra: dict | None = None) -> dict:
    from tlcore import metrics

    row = {
        "variant": name,
        "accuracy": metrics.accuracy(model, test_loader, "cpu"),
        "size_mb": metrics.model_size_mb(model),
        **metrics.latency_ms(model, example, iters=iters),
        "throughput_ips": metrics.throughput(model, example),
    }
    return {**row, **(extra or {})}


def compress(params: Params) -> dict:
    import torch

    from tlcore import compress as C
    from tlcore import data

    set_torch_threads(params)
    cfg = params.compress
    teacher, meta = load_checkpoint(params.path("models", "finetuned.pt"))
    teacher = teacher.cpu().eval()
    train_ds, test_ds = load_domain(params, "target", meta["arch"])
    test_loader = data.make_loader(test_ds, params.evaluate.batch_size, train=False)
    example = torch.stack([test_ds[i][0] for i in range(min(64, len(test_ds)))])
    iters = params.evaluate.latency_iters
    params.path("models", "compressed").mkdir(parents=True, exist_ok=True)
    rows = [measure_variant("fp32", teacher, test_loader, example, iters, {"sparsity": C.sparsity(teacher)})]
    for method in cfg.methods:
        say(f"compress: {method}")
        if method in ("prune", "prune_structured"):
            m = prune_and_recover(params, teacher, train_ds, structured=method == "prune_structured")
            rows.append(
                measure_variant(
                    f"{method}{int(cfg.prune_amount * 100)}",
                    m,
                    test_loader,
                    example,
                    iters,
                    {"sparsity": C.sparsity(m)},
                )
            )
        elif method == "int8":
            calib_ds = train_ds.subset(range(min(256, len(train_ds))), transform=test_ds.transform)
            calib = torch.stack([calib_ds[i][0] for i in range(len(calib_ds))])
            rows.append(measure_variant("int8", C.quantize_int8(teacher, calib), test_loader, example, iters))
        elif method == "distill":
            rows.append(_distill(params, teacher, meta, train_ds, test_loader, example, iters))
    base = rows[0]
    for r in rows:
        r["size_ratio"] = base["size_mb"] / r["size_mb"]
        r["speedup_b1"] = base["latency_ms_p50"] / r["latency_ms_p50"]
        r["accuracy_drop"] = base["accuracy"] - r["accuracy"]
    out = {r["variant"]: {k: v for k, v in r.items() if k != "variant"} for r in rows}
    write_json(params.path("reports", "compress.json"), out)
    say("compress: " + ", ".join(f"{r['variant']} {pct(r['accuracy'])} {r['size_mb']:.2f} MB" for r in rows))
    md = [
        "# Compression trade-offs",
        "",
        "Fine-tuned model and its compressed variants on the target test split "
        "(CPU, batch-1 latency; throughput at batch 256).",
        "",
        table(
            rows,
            [
                "variant",
                "accuracy",
                "accuracy_drop",
                "size_mb",
                "size_ratio",
                "latency_ms_p50",
                "latency_ms_p95",
                "speedup_b1",
                "throughput_ips",
                "sparsity",
            ],
        ),
        "",
        "Unstructured pruning zeroes weights but keeps dense storage: its win is the sparsity column, "
        "realised by a sparse runtime or compression of the file.",
        "",
    ]
    with atomic_path(params.path("reports", "compression.md")) as tmp:
        tmp.write_text("\n".join(md))
    return out


def train_student(params: Params, teacher, student, train_ds, epochs: int, lr: float):
    """Train ``student`` against ``teacher`` (soft targets on the labeled target and the unlabeled pool)."""
    from tlcore import compress as C
    from tlcore import data
    from tlcore.engine import Loaders, TrainConfig, Trainer, seed_everything

    cfg, f = params.compress, params.finetune
    seed_everything(params.base.seed)  # the same student on every run, whatever ran before in this process
    labeled, pool, _ = target_splits(params, train_ds)
    strat = C.Distill(teacher, cfg.distill_temperature, cfg.distill_alpha)  # 0 labels: soft targets on the pool only
    net = strat.setup(student, teacher.num_classes)
    device = device_for(params)
    precision, _ = resolve_precision(f.precision, student.arch, teacher.num_classes, f.batch_size, device)
    tcfg = TrainConfig(
        epochs=epochs,
        steps_per_epoch=f.steps_per_epoch,
        lr=lr,
        weight_decay=f.weight_decay,
        seed=params.base.seed,
        precision=precision,
    )
    workers = loader_workers(params.data.loader_workers, device.type, local_cpus(), labeled.streamed or pool.streamed)
    loaders = Loaders(
        target=data.make_loader(labeled, f.batch_size, True, params.base.seed, workers) if len(labeled) else None,
        unlabeled=data.make_loader(pool, f.batch_size, True, params.base.seed + 1, workers) if len(pool) else None,
    )
    Trainer(net, strat, tcfg, loaders, device=device, callbacks=[EpochLine("compress", epochs, say)], log=None).fit()
    return net.model.cpu().eval()


def prune_and_recover(params: Params, teacher, train_ds, structured: bool):
    """Prune the fine-tuned model, then (``prune_finetune_epochs`` > 0) let it recover by distilling
    from the unpruned model with the masks held, so pruned weights stay zero."""
    from tlcore import compress as C

    cfg = params.compress
    m = (
        C.prune_structured(teacher, cfg.prune_amount, permanent=False)
        if structured
        else C.prune_unstructured(teacher, cfg.prune_amount, permanent=False)
    )
    if cfg.prune_finetune_epochs:
        m = train_student(params, teacher, m, train_ds, cfg.prune_finetune_epochs, params.finetune.lr / 3)
    return C.make_permanent(m).eval()


def _distill(params, teacher, meta, train_ds, test_loader, example, iters) -> dict:
    from tlcore import models

    student_arch = params.compress.student
    # the student learns from and is measured on the teacher's pixels (this run's size and channels); every
    # registered backbone pools adaptively, so its own registered size does not matter here
    student = models.create(student_arch, meta["num_classes"], in_channels=meta["in_channels"])
    student = train_student(params, teacher, student, train_ds, params.compress.distill_epochs, params.finetune.lr)
    save_checkpoint(
        params.path("models", "compressed", "student.pt"),
        student,
        meta["classes"],
        meta["in_channels"],
        {"stage": "compress", "teacher": meta["arch"]},
        spec=spec_from_meta(meta),
    )
    return measure_variant(f"distill_{student_arch}", student, test_loader, example, iters)


if __name__ == "__main__":
    stage_main(compress)
