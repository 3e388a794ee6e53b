"""Data at scale: what preparing and streaming a photo folder costs in time and memory as it grows.

    python -m bench.data_scale                      # 2,000 and 20,000 photos, then 60,000 end to end
    python -m bench.data_scale --sizes 2000 20000 --e2e 0
    python -m bench.data_scale --quick              # 300 and 1,200 photos: a smoke run, into bench_out/

For each size N, a folder of N synthetic 256 px JPEG photos (3 classes, 90 % train) goes through the real
stages, each its own process as `dvc repro` runs it: ``data`` (prepare shards); ``pretrain``,
``finetune`` and ``baselines`` (resnet18 at 224, random init, 2 steps of 16 images each: memory, not accuracy, is
measured) under Ray Train with one worker; ``evaluate`` (streams the whole test split). Each stage's peak memory
is the sum of the proportional set sizes (PSS) of its whole process tree (Ray's processes included), sampled
every 0.2 s.
Also measured: the data stage's images/s on 1 and 2 processes (the same 8,000 photos; 64 camera-size ones),
against what 2 cores of this machine give the same work with nothing shared, and steady-state
training images/s from a streamed split against the same split held in memory (resnet18 at 224, and the
default digits model at 32).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from bench.docs import QUICK_DIR, machine, write_section

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ("red", "green", "blue")


def _photo(i: int, cls: int, size: int = 256) -> np.ndarray:
    """A smooth synthetic photo: a gradient in its class's hue, a bright disc, mild noise (JPEGs of ~10 KB)."""
    rng = np.random.default_rng(i)
    yy, xx = np.mgrid[0:size, 0:size] / size
    base = np.zeros((size, size, 3))
    base[..., cls] = 0.5 + 0.4 * (xx if i % 2 else yy)
    base[..., (cls + 1) % 3] = 0.2 * rng.random()
    (cx, cy), r = rng.random(2) * size, 20 + rng.random() * 40
    base[((xx * size - cx) ** 2 + (yy * size - cy) ** 2) < r * r] += 0.3
    img = np.clip(base * 255 + rng.normal(0, 4, base.shape), 0, 255)
    return img.astype(np.uint8)


CAMERA = (4032, 3024)  # a 12-megapixel phone photo


def _write_camera_photos(args) -> None:
    """Camera-size JPEGs (quality 92, ~4 MB: a textured picture with sensor-like noise)."""
    from PIL import Image

    root, lo, hi = args
    w, h = CAMERA
    for i in range(lo, hi):
        rng = np.random.default_rng(i)
        coarse = Image.fromarray(rng.integers(0, 256, (h // 16, w // 16, 3), dtype=np.uint8)).resize((w, h))
        pixels = np.asarray(coarse, dtype=np.int16) + rng.normal(0, 6, (h, w, 3)).astype(np.int16)
        d = Path(root) / "train" / CLASSES[i % 3]
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(d / f"cam-{i:04d}.jpg", quality=92)


def make_camera_photos(root: Path, n: int) -> Path:
    """``n`` camera-size photos under ``root/train/<class>/``, written by all cores; kept if already there."""
    marker = root / f".complete-{n}"
    if marker.exists():
        return root
    shutil.rmtree(root, ignore_errors=True)
    from concurrent.futures import ProcessPoolExecutor

    step = -(-n // (os.cpu_count() or 1))
    with ProcessPoolExecutor(os.cpu_count()) as pool:
        list(pool.map(_write_camera_photos, [(str(root), lo, min(n, lo + step)) for lo in range(0, n, step)]))
    marker.write_text("")
    return root


def _write_photos(args) -> None:
    from PIL import Image

    root, lo, hi, n = args
    for i in range(lo, hi):
        split = "test" if i % 10 == 9 else "train"
        d = Path(root) / split / CLASSES[i % 3]
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(_photo(i, i % 3)).save(d / f"{i:06d}.jpg", quality=90)


def make_photos(root: Path, n: int) -> Path:
    """``n`` photos under ``root`` (train/test/<class>/), written by all cores; kept if already there."""
    marker = root / f".complete-{n}"
    if marker.exists():
        return root
    shutil.rmtree(root, ignore_errors=True)
    from concurrent.futures import ProcessPoolExecutor

    chunks = [(str(root), lo, min(n, lo + 2000), n) for lo in range(0, n, 2000)]
    with ProcessPoolExecutor(os.cpu_count()) as pool:
        list(pool.map(_write_photos, chunks))
    marker.write_text("")
    return root


class PeakRSS:
    """The peak of the summed proportional set sizes (PSS: a page shared by k processes counts 1/k in each) of a
    process and all its descendants, sampled in a thread. Resident sets would count the pages a forked DataLoader
    process shares with its parent twice."""

    def __init__(self, pid: int, every: float = 0.2):
        import psutil

        self.proc, self.every, self.peak, self._stop = psutil.Process(pid), every, 0, threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
            try:
                procs = [self.proc, *self.proc.children(recursive=True)]
            except psutil.NoSuchProcess:
                return
            total = 0
            for p in procs:
                try:
                    total += p.memory_full_info().pss
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total)
            time.sleep(self.every)

    def stop(self) -> int:
        self._stop.set()
        self._t.join()
        return self.peak


def run_stage(project: Path, stage: str, env: dict) -> dict:
    t = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", f"tasks.stages.{stage}"],
        cwd=project,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    peak = PeakRSS(proc.pid)
    out, _ = proc.communicate()
    rss = peak.stop()
    if proc.returncode != 0:
        raise SystemExit(f"{stage} failed on {project}:\n{out[-4000:]}")
    # the split's closing line, not a progress line
    line = next((ln for ln in out.splitlines() if ln.startswith("data: train: ") and " images in " in ln), "")
    return {"stage": stage, "seconds": time.perf_counter() - t, "peak_gb": rss / 1e9, "log": line}


def project_for(photos: Path, where: Path) -> Path:
    import yaml

    where.mkdir(parents=True, exist_ok=True)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    steps = {"epochs": 1, "steps_per_epoch": 2, "batch_size": 16}
    # 224 px: without ImageNet weights, image_size auto would be the backbone's own 64
    params["data"].update(source=str(photos), target=str(photos), labels_per_class=None, image_size=224)
    params["pretrain"].update(backbone="resnet18", weights=None, **steps)
    params["finetune"].update(strategy="finetune", **steps)
    params["evaluate"].update(latency_iters=2, batch_size=64)
    params["ray"].update(num_workers=1)
    (where / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    shutil.copy(ROOT / "dvc.yaml", where / "dvc.yaml")
    return where


HISTORY = {"pretrain": "history", "finetune": "history", "baselines": "scratch_history"}  # in reports/<stage>.json


def stages_at(photos: Path, n: int, work: Path, env: dict) -> list[dict]:
    project = project_for(photos, work / f"project-{n}")
    rows = []
    for stage in ("data", "pretrain", "finetune", "baselines", "evaluate"):
        print(f"== {n:,} photos: {stage}", flush=True)
        r = run_stage(project, stage, env)
        if stage in HISTORY:  # the training worker's own peak resident set, as the run's history records it
            hist = json.loads((project / "reports" / f"{stage}.json").read_text()).get(HISTORY[stage]) or []
            r["worker_gb"] = max((h.get("peak_rss_mb", 0) for h in hist), default=0) * 2**20 / 1e9
        worker = f", training worker {r['worker_gb']:.2f} GB" if "worker_gb" in r else ""
        print(f"   {r['seconds']:.0f} s, peak {r['peak_gb']:.2f} GB{worker} {r['log']}", flush=True)
        rows.append({"n": n, **r})
    metrics = json.loads((project / "reports" / "metrics.json").read_text())
    rows[-1]["evaluated"] = metrics["test_images"]
    shutil.rmtree(project / "data", ignore_errors=True)  # keep the disk for the next size
    return rows


UNSHARED_TIMEOUT = 600  # seconds: longer than any of these runs takes, short of hanging the benchmark


def _encode_share(chunks: list, ready, done) -> None:
    """One process of :func:`unshared`: encode ``chunks`` as the data stage's encoders do, from the moment all are
    up (``ready``), and report the seconds that took (``done``; None if it failed, after breaking ``ready`` so
    that no one waits for it)."""
    try:
        from tlcore import shards

        shards._encode_chunk(chunks[0], 512)  # warm: imports, codecs, allocator
        ready.wait(timeout=UNSHARED_TIMEOUT)
        t = time.perf_counter()
        for c in chunks:
            shards._encode_chunk(c, 512)
        done.put(time.perf_counter() - t)
    except BaseException:
        ready.abort()
        done.put(None)
        raise


def unshared(chunks: list) -> float:
    """What 2 cores of this machine give this work with nothing shared and nothing to start: the same chunks
    encoded (decode, check, re-encode, hash: all of preparing but the writing) by 1 process and by 2 that are
    already running and start together, alternate chunks each. Returns 2 processes' images/s over 1's."""
    from multiprocessing import get_context

    if len(chunks) < 2:
        raise ValueError(f"{len(chunks)} chunk(s): two processes need at least two")
    ctx = get_context("spawn")
    took = {}
    for procs in (1, 2):
        ready, done = ctx.Barrier(procs + 1), ctx.Queue()
        ps = [ctx.Process(target=_encode_share, args=(chunks[k::procs], ready, done)) for k in range(procs)]
        for p in ps:
            p.start()
        try:
            ready.wait(timeout=UNSHARED_TIMEOUT)  # broken (raises) if a process failed or never came up
            times = [done.get(timeout=UNSHARED_TIMEOUT) for _ in ps]  # each one's own clock: not its exit
        finally:
            for p in ps:
                p.join(timeout=UNSHARED_TIMEOUT)
        if None in times or any(p.exitcode != 0 for p in ps):
            raise RuntimeError(f"an encoding process failed: exit codes {[p.exitcode for p in ps]}")
        took[procs] = max(times)
    return took[1] / took[2]


def prep_throughput(photos: Path, work: Path, n: int, reps: int) -> dict:
    """The data stage's images/s preparing the same ``n`` photos with 1 and with 2 processes, and what this
    machine's 2 cores give that work with nothing shared (:func:`unshared`): the median of ``reps`` runs each,
    taken in turn (1, 2, nothing shared, 1, ...) so that a slow spell of the machine falls on all."""
    from tlcore import folders, shards

    rep = folders.list_split(photos / "train")
    files = [(p, y, f"{rep.classes[y]}/{p.name}") for p, y in rep.files][:n]
    chunks = shards._jobs(files, [shards._size(p) for p, _, _ in files])  # as write_split cuts them
    runs: dict = {1: [], 2: [], "unshared": []}
    for _ in range(reps):
        for procs in (1, 2):
            d = work / f"prep-{procs}"
            shutil.rmtree(d, ignore_errors=True)
            t = time.perf_counter()
            shards.write_split(files, rep.classes, d, max_side=512, processes=procs, shard_bytes=8 * 2**20)
            runs[procs].append(len(files) / (time.perf_counter() - t))
            shutil.rmtree(d, ignore_errors=True)
        runs["unshared"].append(unshared(chunks))
    print(f"   preparing {photos.name}: " + ", ".join(f"{k} {v}" for k, v in runs.items()), flush=True)
    out = {procs: float(np.median(runs[procs])) for procs in (1, 2)}
    ratio = float(np.median(np.asarray(runs[2]) / np.asarray(runs[1])))
    return out | {"reps": reps, "ratio": ratio, "unshared": float(np.median(runs["unshared"])), "runs": runs}


def train_rate(ds, spec, augment: str, steps: int, batch: int, workers: int) -> float:
    """Steady-state training images/s of ``spec``'s model over ``ds`` (the first steps are warm-up)."""
    import torch

    from tlcore import data, models, transforms

    torch.manual_seed(0)
    ds.transform = transforms.build_transform(spec, train=True, augment=augment)
    net = models.create(spec.name, len(ds.classes), in_channels=spec.default_in_channels)
    opt = torch.optim.SGD(net.parameters(), lr=1e-3)
    loader = data.make_loader(ds, batch, train=True, num_workers=workers)
    warm, n, t = 3, 0, None
    while n < steps + warm:
        for x, y in loader:
            x = data.batch_to(x, "cpu", loader)
            loss = torch.nn.functional.cross_entropy(net(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            n += 1
            if n == warm:
                t = time.perf_counter()
            if n == steps + warm:
                break
    return steps * batch / (time.perf_counter() - t)


def streaming_cost(photos: Path, work: Path, quick: bool, reps: int) -> list[dict]:
    """Training images/s from a streamed split vs the same split held in memory, decoded as the training stages
    decode it (a photo split on the random crop's canvas, :func:`tlcore.transforms.train_canvas`, no bigger than
    the stored photos)."""
    import dataclasses

    import torch

    from tasks.modeling import hardware
    from tlcore import data, datasets, folders, models, shards, transforms

    torch.set_num_threads(2)
    rows = []
    cases = [("resnet18", photos / "train", 224, 3, 6 if quick else 20, 16, 300 if quick else 1000)]
    digits = work / "digits"
    if not (digits / "train").exists():
        datasets.materialize("optdigits", digits)
    cases.append(("smallcnn", digits / "train", 32, 1, 20 if quick else 200, 64, None))
    for arch, split, size, channels, steps, batch, limit in cases:
        rep = folders.list_split(split)
        files = [(p, y, f"{rep.classes[y]}/{p.name}") for p, y in rep.files][:limit]
        out = work / f"stream-{arch}"
        shutil.rmtree(out, ignore_errors=True)
        shards.write_split(files, rep.classes, out, max_side=512, processes=2)
        spec = dataclasses.replace(models.get_spec(arch), input_size=size, default_in_channels=channels)
        augment = "photo" if channels == 3 else "digits"
        kw = dict(
            resize=spec.resize_size, interpolation=spec.interpolation, canvas=transforms.train_canvas(spec, augment)
        )
        held = data.open_split(out, size, channels, memory_bytes=2**40, **kw)
        streamed = data.open_split(out, size, channels, memory_bytes=0, **kw)
        canvas = held.images.shape[-1] if kw["canvas"] else None
        # as the training stages load it on this machine's CPU (data.loader_workers: auto), and with one loader
        # process decoding beside the training threads (as a GPU worker's loaders do)
        stage = hardware.loader_workers("auto", "cpu", 2, streamed=True)
        how = {"memory": (held, 0), "streamed": (streamed, stage), "loader": (streamed, 1)}
        runs: dict[str, list[float]] = {k: [] for k in how}
        for _ in range(reps):  # in turn, so that a slow spell of the machine falls on all
            for k, (ds, workers) in how.items():
                runs[k].append(train_rate(ds, spec, augment, steps, batch, workers=workers))
        # each streamed run against the in-memory run just before it: the machine's slow spells cancel out
        ratio = {k: float(np.median(np.asarray(runs[k]) / np.asarray(runs["memory"]))) for k in ("streamed", "loader")}
        rows.append(
            {"arch": arch, "size": size, "canvas": canvas, "images": len(files), "workers": stage}
            | {k: float(np.median(runs[k])) for k in how}
            | {"ratio": ratio["streamed"], "loader_ratio": ratio["loader"], "reps": reps, "runs": runs}
        )
        print(f"   {arch} at {size}: " + ", ".join(f"{k} {v}" for k, v in runs.items()) + " img/s", flush=True)
    return rows


def _prep_rows(prep: dict) -> list[str]:
    """The preparation table's rows: the small photos, and the camera-size ones if measured."""
    out = []
    for p in (prep, prep.get("camera")):
        if not p:
            continue
        what = (
            f"{p['n']} of {CAMERA[0]} x {CAMERA[1]} px (JPEG, ~4 MB, stored at 512 px)"
            if p is not prep
            else f"{p['n']:,} of 256 x 256 px (JPEG, ~10 KB, stored as they are)"
        )
        runs = {str(k): np.asarray(v) for k, v in p["runs"].items()}
        fastest = runs["2"].max() / runs["1"].max()
        # each run's ratio over the one with nothing shared measured just after it
        share = float(np.median(runs["2"] / runs["1"] / runs["unshared"]))
        digits = 0 if np.median(runs["1"]) > 100 else 1
        out.append(
            f"| {what} | {len(runs['1'])} | {np.median(runs['1']):,.{digits}f} | {np.median(runs['2']):,.{digits}f} | "
            f"{p['ratio']:.2f}x | {fastest:.2f}x | {p['unshared']:.2f}x | {share:.2f} |"
        )
    return out


def render(rows: list[dict], prep: dict, cost: list[dict], quick: bool) -> str:
    by_n = sorted({r["n"] for r in rows})
    lines = [
        "## Data at scale: prepared once, streamed to every worker",
        "",
        f"`python -m bench.data_scale{' --quick' if quick else ''}` on {machine()}. A folder of N synthetic "
        "256 px JPEG photos (3 classes, 90 % train) through the real stages, each its own process: `data` "
        "prepares tar shards (on both cores); `pretrain`, `finetune` and `baselines` (scratch) train resnet18 at 224 "
        "(random init, 2 steps of 16: memory is measured, not accuracy) under Ray Train with one worker; "
        "`evaluate` streams the whole test split. Peak memory: the summed proportional set sizes (PSS) of the "
        "stage's process tree, Ray's processes included, sampled every 0.2 s.",
        "",
        "| photos | stage | wall time | peak memory (process tree) | training worker's peak RSS |",
        "|---|---|---|---|---|",
    ]
    for n in by_n:
        for r in (r for r in rows if r["n"] == n):
            what = r["stage"] + (f" ({r['evaluated']:,} test images)" if r.get("evaluated") else "")
            worker = f"{r['worker_gb']:.2f} GB" if r.get("worker_gb") else "-"
            lines.append(f"| {n:,} | {what} | {r['seconds']:.0f} s | {r['peak_gb']:.2f} GB | {worker} |")
    ft = {r["n"]: r for r in rows if r["stage"] == "finetune"}
    if len(ft) >= 2:
        lo = min(ft)
        lines += [""]
        for key, what in (("peak_gb", "the process tree's peak"), ("worker_gb", "the training worker's peak")):
            if not all(r.get(key) for r in ft.values()):
                continue
            worst = max(ft, key=lambda n: ft[n][key])
            lines.append(
                f"- `finetune`, {what}: {ft[lo][key]:.2f} GB at {lo:,} photos; at most "
                f"{ft[worst][key] / ft[lo][key]:.2f}x that at any size ({ft[worst][key]:.2f} GB at {worst:,} "
                f"photos), for up to {max(ft) / lo:.0f}x the photos."
            )
        lines += [
            "",
            "One run per size: the process tree's peak also carries the run-to-run spread of Ray's own "
            "processes. Before, every stage decoded the split into one tensor and Ray shipped a copy to each "
            "worker (~0.43 GB more per 1,000 photos at 224).",
        ]
    lines += [
        "",
        "Preparing (`data`: decode, check, store, hash, write the shards), in images/s: the median of the runs of "
        "each, taken in turn (1 process, 2, nothing shared, 1, ...); a ratio is the median of a run's rate over the "
        "1-process run's just before it; *fastest* divides the fastest run of each, the one the machine disturbed "
        "least (timeit's rule). *Nothing shared*: what this machine's 2 cores gave the same work at that moment "
        "with no start-up, no writer and nothing to coordinate: the same chunks encoded by 2 processes already "
        "running and started together at a barrier, alternate chunks each, against 1 such process (the median "
        "over the runs). On this shared VM it moves from run to run, past 2x at times (one process alone ran "
        "slower than each of two), so it is a reference, not a bound. The last column: each run's ratio over the "
        "one with nothing shared measured right after it (the median).",
        "",
        "| photos | runs | 1 process | 2 processes | ratio | fastest | nothing shared | ratio / nothing shared |",
        "|---|---|---|---|---|---|---|---|",
        *_prep_rows(prep),
        "",
        "What streaming costs (steady-state training images/s on the CPU, 2 torch threads; the same images decoded "
        "as the training stages decode them: a photo split on the random crop's canvas, no bigger than the stored "
        "photos, cropped to the input). In memory: decoded once. Streamed: as the training stages load it here "
        "(`data.loader_workers: auto` on a CPU: decoded in the training process, batch by batch). With a loader "
        "process: one process decodes ahead of the training step, beside torch's threads (what a GPU worker's "
        f"loaders do). The median of {cost[0].get('reps', 1) if cost else 1} runs each, taken in turn; each ratio "
        "is the median of a run's rate over the in-memory run's just before it.",
        "",
        "| model | input (decoded at) | images | in memory | streamed | ratio | with a loader process | ratio |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in cost:
        at = f" ({c['canvas']} px)" if c.get("canvas") else ""
        loader = f"{c['loader']:.1f} img/s | {c['loader_ratio']:.2f}" if "loader" in c else "- | -"
        lines.append(
            f"| {c['arch']} | {c['size']} px{at} | {c['images']:,} | {c['memory']:.1f} img/s | "
            f"{c['streamed']:.1f} img/s | {c.get('ratio', c['streamed'] / c['memory']):.2f} | {loader} |"
        )
    lines += [
        "",
        "Splits whose decoded pixels fit in 256 MiB (`data.hold_in_memory_mib`) are held in memory "
        "(`tlcore.data.open_split`), bigger ones streamed: the same dataset class, loader and sampler serve both. "
        "So the default digits run (a few MB of pixels) trains at the in-memory rate; the smallcnn row shows what "
        "streaming tiny images would cost, where decoding is a bigger share of a short step.",
    ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="*", default=None)
    ap.add_argument("--e2e", type=int, default=None, help="one more size, end to end (default 60,000)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--work", type=Path, default=None, help="where photos and projects go (default: a temp dir)")
    ap.add_argument("--render", action="store_true", help="only rewrite the docs section from the saved results")
    ap.add_argument("--cost-only", action="store_true", help="measure only what streaming costs; keep the rest saved")
    ap.add_argument("--prep-only", action="store_true", help="measure only the preparation; keep the rest saved")
    args = ap.parse_args()
    where = QUICK_DIR if args.quick else ROOT / "docs"
    sizes = args.sizes or ([300, 1200] if args.quick else [2000, 20000])
    cost_reps = 1 if args.quick else 5
    prep_n = 4000 if args.quick else 8000  # photos: several seconds on one core, so the data stage uses every core
    prep_reps = 2 if args.quick else 5

    def measure_prep(work: Path) -> dict:
        big = make_photos(work / f"photos-{prep_n * 10 // 9 + 10}", prep_n * 10 // 9 + 10)
        cam_n = 16 if args.quick else 64  # several seconds on one core
        cam = make_camera_photos(work / f"camera-{cam_n}", cam_n)
        camera = prep_throughput(cam, work, cam_n, reps=1 if args.quick else 3)
        camera = {str(k): v for k, v in camera.items()} | {"n": cam_n}  # as JSON will read it back
        return {"n": prep_n, **prep_throughput(big, work, prep_n, reps=prep_reps), "camera": camera}

    if args.render or args.cost_only or args.prep_only:
        saved = json.loads((where / "data_scale.json").read_text())
        measure = args.cost_only or args.prep_only
        work = args.work or (Path(tempfile.mkdtemp(prefix="tl-data-scale-")) if measure else None)
        if args.cost_only:
            first = make_photos(work / f"photos-{min(sizes)}", min(sizes))
            saved["streaming_cost"] = streaming_cost(first, work, args.quick, reps=cost_reps)
        if args.prep_only:
            saved["prep"] = measure_prep(work)
        if args.cost_only or args.prep_only:
            (where / "data_scale.json").write_text(json.dumps(saved, indent=1))
        prep = {int(k) if str(k).isdigit() else k: v for k, v in saved["prep"].items()}  # JSON made the keys strings
        body = render(saved["stages"], prep, saved["streaming_cost"], args.quick)
        print(f"wrote {write_section('data-scale', body, **({'doc': where / 'benchmarks.md'} if args.quick else {}))}")
        return
    e2e = args.e2e if args.e2e is not None else (0 if args.quick else 60000)
    work = args.work or Path(tempfile.mkdtemp(prefix="tl-data-scale-"))
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "RAY_USAGE_STATS_ENABLED": "0",
        "DO_NOT_TRACK": "1",
        "TL_CACHE_DIR": str(work / "cache"),
    }
    rows = []
    for n in sorted(set(sizes + ([e2e] if e2e else []))):
        photos = make_photos(work / f"photos-{n}", n)
        rows += stages_at(photos, n, work, env)
    first = make_photos(work / f"photos-{min(sizes)}", min(sizes))
    prep = measure_prep(work)
    cost = streaming_cost(first, work, args.quick, reps=cost_reps)
    where.mkdir(parents=True, exist_ok=True)
    out = where / "data_scale.json"
    out.write_text(json.dumps({"stages": rows, "prep": prep, "streaming_cost": cost}, indent=1))  # before rendering
    body = render(rows, prep, cost, args.quick)
    doc = write_section("data-scale", body, **({"doc": where / "benchmarks.md"} if args.quick else {}))
    print(f"wrote {doc} and {out}")


if __name__ == "__main__":
    main()
