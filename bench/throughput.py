"""Training throughput: the project's engine in-process vs under Ray Train (local mode, 1 and 2 workers).

The overhead figure compares like with like: the *same* engine (``tasks.modeling.train``), model, data,
global batch, threads and precision, once in this process and once under Ray Train. A plain
PyTorch loop (the seed article's) is shown for reference, and the engine at ``precision: auto``
shows what the measured precision choice buys on this CPU. Start-up (worker group, set-up) is
reported apart from steady-state images/s. Writes a section of docs/benchmarks.md.

    python -m bench.throughput [--images 4000 --epochs 4 --batch 128]
    python -m bench.throughput --backbone resnet18 [--size 224 --images 128 --epochs 3 --batch 32]

``--backbone`` measures a torchvision backbone instead, at the native resolution of its ImageNet weights
(224 for resnet18, with their resize / crop and normalisation, as ``pretrain.weights`` feeds it) on RGB
photos with the photo augmentation: training images/s (fp32 and ``precision: auto``), batch-1 latency and
batch throughput, so a user can estimate a run on their own data. It writes its own section
(``backbone-<name>``); ``--quick`` writes to bench_out/ instead of docs/.
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time

from bench.docs import QUICK_DIR, machine, write_section


def _data(n: int):
    from tlcore import data, datasets, models, transforms

    x, y = datasets.render_synth_digits(n // 10, seed=0)
    return data.ImageDataset.from_numpy(
        x, y, datasets.CLASSES, transforms.build_transform(models.get_spec("smallcnn"), True)
    )


def _params(epochs: int, batch: int, precision: str, workers: int = 0, threads: int | None = None, storage: str = "."):
    from tasks.project.config import Params

    return Params.model_validate(
        {
            "base": {"num_threads": threads},
            "finetune": {
                "epochs": epochs,
                "batch_size": batch,
                "lr": 3e-3,
                "steps_per_epoch": None,
                "grad_clip": None,
                "weight_decay": 0.0,
                "scheduler": "constant",
                "precision": precision,
            },
            "ray": {"num_workers": workers, "storage_path": storage},
        }
    )


def _job(params, ds):
    from tasks.modeling.train import TrainJob

    return TrainJob(arch="smallcnn", num_classes=10, strategy="scratch", optim=params.finetune, seed=0, labeled=ds)


def _row(setup: str, workers: int, threads: int, precision: str, hist: list[dict], total: float, rss: float) -> dict:
    steady = hist[1:]
    images = sum(h["train_images_per_s"] * h["epoch_time_s"] for h in steady)  # the engine counts every rank
    return {
        "setup": setup,
        "workers": workers,
        "threads": threads,
        "precision": precision,
        "images_per_s": images / sum(h["epoch_time_s"] for h in steady),
        "startup_s": total - sum(h["epoch_time_s"] for h in hist),
        "peak_rss_mb": rss,
    }


def plain_loop(ds, epochs: int, batch: int, threads: int) -> dict:
    """The seed article's loop: model, optimiser, `for x, y in loader` — nothing else (fp32, NCHW)."""
    import torch
    from torch import nn

    from tlcore import models

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model = models.create("smallcnn", 10)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True, drop_last=True)
    loss_fn = nn.CrossEntropyLoss()
    hist = []
    for epoch in range(epochs):
        te, n_img = time.perf_counter(), 0
        model.train()
        for x, y in loader:
            opt.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            opt.step()
            n_img += len(x)
        dt = time.perf_counter() - te
        hist.append({"epoch": epoch + 1, "epoch_time_s": dt, "train_images_per_s": n_img / dt})
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return _row("plain PyTorch loop (reference)", 1, threads, "fp32", hist, time.perf_counter() - t0, rss)


def engine_in_process(ds, epochs: int, batch: int, threads: int, precision: str) -> dict:
    import torch

    from tasks.modeling.train import run_job

    torch.set_num_threads(threads)
    params = _params(epochs, batch, precision)
    job = _job(params, ds)
    t0 = time.perf_counter()
    _, hist = run_job(job, "cpu", log=None)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return _row("engine in-process", 1, threads, job.optim.precision, hist, time.perf_counter() - t0, rss)


def ray_run(ds, epochs: int, batch: int, workers: int, threads: int, storage: str, precision: str) -> dict:
    from tasks.modeling.ray_train import run_job_ray

    params = _params(epochs, batch, precision, workers, threads, storage)
    t0 = time.perf_counter()
    _, hist, info = run_job_ray(
        _job(params, ds), params, f"bench-{workers}w", {"source": {"splits": {}}, "target": {"splits": {}}}
    )
    label = "Ray Train local mode" if workers == 0 else f"Ray Train, {workers} worker(s)"
    rss = max(h.get("peak_rss_mb", 0.0) for h in hist) or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return _row(label, max(1, workers), threads, info["precision"], hist, time.perf_counter() - t0, rss)


def backbone(args) -> None:
    """``--backbone``: a torchvision backbone at its weights' native size on CPU (see the module docstring)."""
    import torch

    from tasks.modeling.hardware import local_cpus
    from tasks.modeling.model_input import weights_spec
    from tasks.modeling.train import TrainJob, run_job
    from tlcore import data, metrics, models, transforms

    # the ImageNet weights' resolution, crop and normalisation; random values (speed does not depend on them)
    spec = weights_spec(args.backbone, "DEFAULT", args.size or "auto", 3)
    size, threads = spec.input_size, local_cpus()
    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (args.images, 3, size, size), dtype=torch.uint8, generator=g)
    ds = data.ImageDataset(
        x,
        torch.arange(args.images) % 10,
        [str(i) for i in range(10)],
        transforms.build_transform(spec, True, augment="photo"),
    )
    rows = []
    for precision in ("fp32", "auto"):
        params = _params(args.epochs, args.batch, precision)
        job = TrainJob(
            arch=args.backbone, num_classes=10, strategy="finetune", optim=params.finetune, seed=0, labeled=ds
        )
        t0 = time.perf_counter()
        _, hist = run_job(job, "cpu", log=None)
        rows.append(
            _row(
                "train (engine, photo augmentation)",
                1,
                threads,
                job.optim.precision,
                hist,
                time.perf_counter() - t0,
                resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            )
        )
    model = models.create(args.backbone, 10).eval()
    example = transforms.build_transform(spec, False)(x[: args.batch])
    with torch.inference_mode():
        lat = metrics.latency_ms(model, example, iters=args.iters)
        ips = metrics.throughput(model, example, batch_size=args.batch, iters=3)
    crop = f", shorter side resized to {spec.resize_size} then centre-cropped" if spec.resize_size else ""
    lines = [
        f"## A torchvision backbone at its native size: {args.backbone} on CPU",
        "",
        f"`python -m bench.throughput --backbone {args.backbone} --size {size} --images {args.images} "
        f"--epochs {args.epochs} --batch {args.batch}`: `{args.backbone}` at {size}x{size} RGB{crop} (as "
        f"`pretrain.weights` feeds it), training every layer (`finetune`) on {args.images} random photos with "
        f"the photo augmentation, batch {args.batch}, steady-state images/s over epochs 2..{args.epochs} (start-up "
        f"= everything outside the epochs; for `auto` on a CPU with bf16 kernels it includes the one-off "
        f"measurement that picks the precision, cached per machine afterwards); fp32 inference latency at batch 1 "
        f"over {args.iters} runs and "
        f"throughput at batch {args.batch}; {threads} threads. Machine: {machine()}.",
        "",
        "| measurement | precision | value |",
        "|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| training images/s | {r['precision']} | {r['images_per_s']:.1f} (start-up "
            f"{r['startup_s']:.1f} s, peak RSS {r['peak_rss_mb']:.0f} MB) |"
        )
    lines += [
        f"| inference latency, batch 1, p50 / p95 (ms) | fp32 | {lat['latency_ms_p50']:.1f} / "
        f"{lat['latency_ms_p95']:.1f} |",
        f"| inference images/s, batch {args.batch} | fp32 | {ips:.1f} |",
        "",
        f"A run's training time is about (images x epochs) / images/s: e.g. 1,000 labeled images for 10 "
        f"epochs at {rows[0]['images_per_s']:.1f} images/s take {1000 * 10 / rows[0]['images_per_s'] / 60:.0f} min "
        f"here in fp32.",
    ]
    print("\n".join(lines))
    doc = QUICK_DIR / "benchmarks.md" if args.quick else None
    print(f"wrote {write_section(f'backbone-{args.backbone}', chr(10).join(lines), *([doc] if doc else []))}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=None, help="default: 4000 (smallcnn), 128 (--backbone)")
    ap.add_argument("--epochs", type=int, default=None, help="default: 4 (smallcnn), 3 (--backbone); >= 2")
    ap.add_argument("--batch", type=int, default=None, help="default: 128 (smallcnn), 32 (--backbone)")
    ap.add_argument("--repeats", type=int, default=2, help="runs per setup; the fastest is reported")
    ap.add_argument("--backbone", help="measure this torchvision backbone (e.g. resnet18) at its native size instead")
    ap.add_argument("--size", type=int, default=None, help="--backbone: image size (default: its weights' own, 224)")
    ap.add_argument("--iters", type=int, default=50, help="--backbone: batch-1 latency repetitions")
    ap.add_argument("--quick", action="store_true", help="--backbone: write to bench_out/, not docs/ (smoke runs)")
    args = ap.parse_args(argv)
    small = args.backbone is None
    args.images = args.images or (4000 if small else 128)
    args.epochs = args.epochs or (4 if small else 3)
    args.batch = args.batch or (128 if small else 32)
    if args.epochs < 2:
        ap.error("--epochs must be >= 2: the first epoch is start-up, images/s are measured over the others")
    if not small:
        return backbone(args)
    import ray

    from tasks.modeling.hardware import local_cpus

    ds = _data(args.images)
    threads = local_cpus()
    a = (ds, args.epochs, args.batch)

    def best(run):  # this machine's speed drifts between runs: each setup runs --repeats times, fastest kept
        return max((run() for _ in range(args.repeats)), key=lambda r: r["images_per_s"])

    with tempfile.TemporaryDirectory() as storage:
        rows = [
            best(lambda: plain_loop(*a, threads)),
            best(lambda: engine_in_process(*a, threads, "fp32")),
            best(lambda: ray_run(*a, 0, threads, storage, "fp32")),
        ]
        t = time.perf_counter()
        ray.init(num_cpus=threads, include_dashboard=False, logging_level="WARNING")
        ray_init_s = time.perf_counter() - t
        rows.append(best(lambda: ray_run(*a, 1, threads, storage, "fp32")))
        if threads >= 2:
            rows.append(best(lambda: ray_run(*a, 2, threads // 2, storage, "fp32")))
        ray.shutdown()
        rows.append(best(lambda: engine_in_process(*a, threads, "auto")))
        rows.append(best(lambda: ray_run(*a, 0, threads, storage, "auto")))
    base = rows[1]["images_per_s"]
    overhead = rows[3]["images_per_s"] / base
    lines = [
        "## Training throughput: the engine in-process vs under Ray Train",
        "",
        f"`python -m bench.throughput --images {args.images} --epochs {args.epochs} --batch {args.batch} "
        f"--repeats {args.repeats}` (fastest of the repeats per setup): "
        f"`smallcnn` on synthetic digits, global batch {args.batch}, steady-state images/s over epochs "
        f"2..{args.epochs}; start-up = everything outside the epochs (worker group, model and data set-up; "
        f"`ray.init` took {ray_init_s:.1f} s on top for the worker rows). Every row but the reference runs the "
        f"project's engine (`tasks.modeling.train`, channels-last) with the same threads in total; *vs engine* "
        f"divides by the engine in-process at the same precision. Machine: {machine()}.",
        "",
        "| setup | workers x threads | precision | images/s | vs engine | start-up (s) | peak RSS per worker (MB) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ref = next(
            (x["images_per_s"] for x in rows if x["setup"] == "engine in-process" and x["precision"] == r["precision"]),
            base,
        )
        lines.append(
            f"| {r['setup']} | {r['workers']} x {r['threads']:g} | {r['precision']} | {r['images_per_s']:.0f} | "
            f"{r['images_per_s'] / ref:.2f} | {r['startup_s']:.1f} | {r['peak_rss_mb']:.0f} |"
        )
    local = rows[2]["images_per_s"] / base
    lines += [
        "",
        f"Ray Train's overhead on steady-state training vs the same engine in-process: {local:.2f} in local "
        f"mode (`ray.num_workers: 0`, the pipeline's default) and {overhead:.2f} with 1 worker (goal >= 0.95). "
        + (
            f"A worker run shares the machine's {threads} cores with Ray's own processes (GCS, raylet, the "
            f"Train controller); local mode runs none. "
            if overhead < 0.95
            else ""
        )
        + f"`precision: auto` chose {rows[-2]['precision']} here "
        f"({rows[-2]['images_per_s'] / base:.2f}x the fp32 engine).",
    ]
    print("\n".join(lines))
    print(f"wrote {write_section('throughput', chr(10).join(lines))}")


if __name__ == "__main__":
    main()
