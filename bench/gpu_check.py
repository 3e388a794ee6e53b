"""`make gpu-check`: does the project work on this machine's GPU? About 5 minutes on one GPU.

1. The ``gpu``-marked tests (``pytest -m gpu tests/test_gpu.py``: one GPU in its own precision and in fp16 with a
   resume; the two-GPU test skips, saying why, on a machine with one).
2. ``tl run`` end to end on the embedded data in a fresh copy of the project (the checkout is left alone), with
   ``ray.use_gpu=true`` and resnet18 at 224 x 224 for a few steps per stage (:data:`OVERRIDES`). It prints each
   training stage's images/s (last epoch), the precision ``auto`` chose and why, and the GPU memory peak
   (``nvidia-smi``, the whole device, sampled twice a second).

Exit 0 when everything passed; 1 when a test or the run failed, a training stage did not train on the GPU, or
their output holds a traceback; 2, before doing anything, on a machine where torch sees no CUDA device.

    python -m bench.gpu_check [--skip-tests] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TL = Path(sys.executable).parent / "tl"
#: the short run: resnet18 from scratch at its weights' native size, a few small epochs per training stage
OVERRIDES = [
    "ray.use_gpu=true",
    "ray.gpus_per_worker=1",
    "pretrain.backbone=resnet18",
    "data.image_size=224",
    "data.synth_per_class=50",
    "data.synth_test_per_class=10",
    "pretrain.epochs=2",
    "pretrain.steps_per_epoch=10",
    "pretrain.batch_size=64",
    "finetune.epochs=2",
    "finetune.steps_per_epoch=10",
    "finetune.batch_size=64",
    "evaluate.latency_iters=5",
    "compress.prune_finetune_epochs=1",
    "compress.distill_epochs=1",
]
TRAINING_STAGES = ("pretrain", "finetune")
TESTS_TIMEOUT_S, RUN_TIMEOUT_S = 240, 420


def no_gpu_message() -> str:
    """One paragraph: this machine has no CUDA device torch can use (naming a too-old NVIDIA driver if that is why)."""
    from tasks.modeling.hardware import no_cuda_message

    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return no_cuda_message(
        "make gpu-check (python -m bench.gpu_check) needs a CUDA GPU, but this process",
        (f" (CUDA_VISIBLE_DEVICES={visible!r})" if visible is not None else "")
        + ", so nothing was checked. Run it on a machine with an NVIDIA GPU of compute capability 7.5 or newer "
        "and driver 580 or newer (nvidia-smi lists both); on a machine without one, make test is the check.",
        "or run make test, which needs no GPU, instead; nothing was checked",
    )


def summary_lines(reports: dict[str, dict], output: str, memory: tuple[int, int, int] | None) -> list[str]:
    """What a run measured: per training stage its last epoch's images/s and the precision chosen (with the reason
    the stage printed, from ``output``); then the GPU memory peak, ``memory`` being ``(peak, before, total)`` in
    MiB (``None``: not measured). ``reports``: each stage's ``reports/<stage>.json``."""
    lines = []
    for stage in TRAINING_STAGES:
        report = reports.get(stage) or {}
        history = report.get("history") or []
        if not history:
            lines.append(f"{stage}: no training epochs recorded")
            continue
        last = history[-1]
        why = next(
            (
                line.split(" precision ", 1)[1].strip()
                for line in output.splitlines()
                if f"[{stage}] training on " in line and " precision " in line
            ),
            None,
        )
        lines.append(
            f"{stage}: {last['train_images_per_s']:.0f} images/s (epoch {last['epoch']} of {len(history)}, "
            f"{last['epoch_time_s']:.2f} s), precision {why or report.get('precision', '?')}"
        )
    if memory is None:
        lines.append("GPU memory peak: not measured (nvidia-smi not found)")
    else:
        peak, before, total = memory
        lines.append(
            f"GPU memory peak: {peak:,} MiB of {total:,} MiB (nvidia-smi, whole device; {before:,} MiB in use before "
            "the run)"
        )
    return lines


def problems(output: str, trained_on_gpu: bool = True) -> list[str]:
    """What makes a finished command's ``output`` a failure even with exit status 0: a traceback anywhere, or a
    training stage that did not say it trained on CUDA (``trained_on_gpu``: the output is a ``tl run``'s)."""
    found = []
    if "Traceback (most recent call last)" in output:
        found.append("a traceback in the output")
    if trained_on_gpu:
        found += [
            f"{stage} did not train on the GPU (no '[{stage}] training on cuda' line)"
            for stage in TRAINING_STAGES
            if f"[{stage}] training on cuda" not in output
        ]
    return found


class _MemoryPeak:
    """Samples ``nvidia-smi``'s used memory (the largest over the GPUs) until :meth:`stop`."""

    def __init__(self, every_s: float = 0.5):
        self.smi, self.every_s, self.peak, self.total = shutil.which("nvidia-smi"), every_s, 0, 0
        self._stop = threading.Event()
        self.before = self._sample()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _sample(self) -> int:
        if self.smi is None:
            return 0
        r = subprocess.run(
            [self.smi, "--query-gpu=memory.used,memory.total", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
        )
        rows = [[int(v) for v in line.split(",")] for line in r.stdout.splitlines() if line.strip()]
        if r.returncode != 0 or not rows:
            return 0
        self.total = max(total for _, total in rows)
        return max(used for used, _ in rows)

    def _loop(self) -> None:
        while not self._stop.wait(self.every_s):
            self.peak = max(self.peak, self._sample())

    def __enter__(self) -> _MemoryPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def result(self) -> tuple[int, int, int] | None:
        return None if self.smi is None else (self.peak, self.before, self.total)


def _run(cmd: list[str], cwd: Path, env: dict, timeout_s: float) -> tuple[int, str]:
    """Run ``cmd``, echoing its output as it comes; ``(exit status, output)``. Past ``timeout_s`` its whole process
    group (``tl`` starts DVC, which starts the stages) is killed and the status is 124."""
    print(f"$ {' '.join(cmd)}", flush=True)
    proc = subprocess.Popen(
        cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    expired = threading.Event()

    def kill() -> None:
        expired.set()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)

    timer = threading.Timer(timeout_s, kill)
    timer.start()
    out = []
    try:
        for line in proc.stdout:
            out.append(line)
            print(f"  {line}", end="", flush=True)
        rc = proc.wait()
    finally:
        timer.cancel()
    return (124 if expired.is_set() else rc), "".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--skip-tests", action="store_true", help="only the tl run, not pytest -m gpu")
    ap.add_argument("--workdir", type=Path, help="keep the project copy of the run here (default: a temp dir)")
    args = ap.parse_args(argv)

    import torch

    if not torch.cuda.is_available() or torch.cuda.device_count() == 0:
        print(no_gpu_message(), file=sys.stderr)
        return 2
    from bench.docs import machine
    from tasks.project.env import copy_env, copy_project

    t0 = time.perf_counter()
    print(f"gpu-check on {machine()}; {torch.cuda.device_count()} GPU(s)", flush=True)
    failures = []
    env = copy_env()
    if not args.skip_tests:
        cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "tests/test_gpu.py", "-q", "-rs", "-p", "no:cacheprovider"]
        rc, out = _run(cmd, ROOT, env, TESTS_TIMEOUT_S)
        failures += [f"pytest -m gpu: {p}" for p in problems(out, trained_on_gpu=False)]
        if rc != 0:
            failures.append(
                f"pytest -m gpu exited {rc}" + (f" (killed after {TESTS_TIMEOUT_S} s)" if rc == 124 else "")
            )
    with tempfile.TemporaryDirectory() as tmp:
        repo = copy_project((args.workdir or Path(tmp)) / "repo")
        env = {**env, "TL_CACHE_DIR": str(Path(tmp) / "cache")}
        with _MemoryPeak() as memory:
            rc, out = _run([str(TL), "run", *(a for o in OVERRIDES for a in ("-S", o))], repo, env, RUN_TIMEOUT_S)
        reports = {}
        for stage in TRAINING_STAGES:
            f = repo / "reports" / f"{stage}.json"
            reports[stage] = json.loads(f.read_text()) if f.is_file() else {}
    failures += [f"tl run: {p}" for p in problems(out)]
    if rc != 0:
        failures.append(f"tl run exited {rc}" + (f" (killed after {RUN_TIMEOUT_S} s)" if rc == 124 else ""))
    print("\n".join(["", "gpu-check:", *summary_lines(reports, out, memory.result())]))
    print(f"{'FAILED: ' + '; '.join(failures) if failures else 'passed'} ({time.perf_counter() - t0:.0f} s)")
    return 1 if failures else 0


if __name__ == "__main__":
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    sys.exit(main())
