"""Training throughput: plain PyTorch loop vs Ray Train (1 worker, 2 workers x 1 thread).

Same model, global batch, data and epochs in each. Start-up (cluster + worker group + first
batch) is reported apart from steady-state images/s. Writes a section of docs/benchmarks.md.

    python -m bench.throughput [--images 4000 --epochs 4 --batch 128]
"""
from __future__ import annotations

import argparse
import resource
import tempfile
import time

from bench.docs import machine, write_section


def _data(n: int):
    from tlcore import data, datasets, models

    x, y = datasets.render_synth_digits(n // 10, seed=0)
    return data.ImageDataset.from_numpy(x, y, datasets.CLASSES, data.build_transform(models.get_spec("smallcnn"), True))


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
    epoch_times, n_img = [], 0
    for _ in range(epochs):
        te, n_img = time.perf_counter(), 0
        model.train()
        for x, y in loader:
            opt.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            opt.step()
            n_img += len(x)
        epoch_times.append(time.perf_counter() - te)
    total = time.perf_counter() - t0
    return {"setup": "plain PyTorch loop", "workers": 1, "threads": threads,
            "images_per_s": n_img * (epochs - 1) / sum(epoch_times[1:]), "startup_s": total - sum(epoch_times),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "wall_s": total}


def ray_run(ds, epochs: int, batch: int, workers: int, threads: int, storage: str, precision: str = "fp32") -> dict:
    from tasks.config import Params
    from tasks.distributed import run_job_ray
    from tasks.training import TrainJob

    params = Params.model_validate({
        "finetune": {"epochs": epochs, "batch_size": batch, "lr": 3e-3, "steps_per_epoch": None, "grad_clip": None,
                     "weight_decay": 0.0, "scheduler": "constant", "precision": precision},
        "ray": {"num_workers": workers, "cpus_per_worker": threads, "storage_path": storage}})
    job = TrainJob(arch="smallcnn", num_classes=10, strategy="scratch", optim=params.finetune, seed=0, labeled=ds)
    t0 = time.perf_counter()
    _, hist = run_job_ray(job, params, f"bench-{workers}w", {"source": {"splits": {}}, "target": {"splits": {}}})
    total = time.perf_counter() - t0
    steady = hist[1:]
    images = sum(h["train_images_per_s"] * h["epoch_time_s"] for h in steady) * workers  # rank 0 counts its shard
    from tlcore.engine import resolve_precision

    label = f"precision {precision}" + ("" if precision == "fp32" else f" -> {resolve_precision(precision, 'cpu')}")
    return {"setup": f"Ray Train, {workers} worker(s), {label}", "workers": workers, "threads": threads,
            "images_per_s": images / sum(h["epoch_time_s"] for h in steady),
            "startup_s": total - sum(h["epoch_time_s"] for h in hist),
            "peak_rss_mb": max(h.get("peak_rss_mb", 0.0) for h in hist), "wall_s": total}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=4000)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--batch", type=int, default=128)
    args = ap.parse_args(argv)
    import os

    import ray

    ds = _data(args.images)
    threads = min(2, os.cpu_count() or 1)
    rows = [plain_loop(ds, args.epochs, args.batch, threads)]
    with tempfile.TemporaryDirectory() as storage:
        t = time.perf_counter()
        ray.init(num_cpus=threads, include_dashboard=False, logging_level="WARNING")
        ray_init_s = time.perf_counter() - t
        rows.append(ray_run(ds, args.epochs, args.batch, 1, threads, storage))
        if threads >= 2:
            rows.append(ray_run(ds, args.epochs, args.batch, 2, 1, storage))
        rows.append(ray_run(ds, args.epochs, args.batch, 1, threads, storage, precision="auto"))
        ray.shutdown()
    base = rows[0]["images_per_s"]
    lines = ["## Training throughput: plain loop vs Ray Train", "",
             f"`python -m bench.throughput --images {args.images} --epochs {args.epochs} --batch {args.batch}`: "
             f"`smallcnn` on synthetic digits, global batch {args.batch}, steady-state images/s over epochs 2..{args.epochs} "
             f"(start-up = everything outside the epochs: worker group, model/data set-up; `ray.init` took "
             f"{ray_init_s:.1f} s on top). The plain loop is fp32 in NCHW; the Ray rows run the project's engine "
             f"(channels-last convolutions) in fp32, then at the pipeline's default precision `auto` (bf16 autocast "
             f"where the CPU has native bf16). Machine: {machine()}.", "",
             "| setup | workers x threads | images/s | vs plain | start-up (s) | peak RSS per worker (MB) |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['setup']} | {r['workers']} x {r['threads']:g} | {r['images_per_s']:.0f} | "
                     f"{r['images_per_s'] / base:.2f} | {r['startup_s']:.1f} | {r['peak_rss_mb']:.0f} |")
    print("\n".join(lines))
    print(f"wrote {write_section('throughput', chr(10).join(lines))}")


if __name__ == "__main__":
    main()
