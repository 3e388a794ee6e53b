"""Write a generated section into docs/benchmarks.md between markers, leaving other sections alone."""

from __future__ import annotations

import platform
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"
# smoke runs (--quick) write here instead, so they never overwrite the measured results in docs/
QUICK_DIR = Path(__file__).resolve().parents[1] / "bench_out"
HEADER = "# Benchmarks\n\nEvery number below is written by a script in `bench/`; none is typed by hand.\n"


def machine() -> str:
    import os

    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    from tlcore.precision import cpu_bf16_kernels, cpu_has_amx

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    flags = f"AMX {'yes' if cpu_has_amx() else 'no'}, AVX512-BF16 {'yes' if cpu_bf16_kernels() else 'no'}"
    return (
        f"{os.cpu_count()} CPU cores ({cpu}; {flags}), GPU: {gpu}, Python {platform.python_version()}, "
        f"torch {torch.__version__}"
    )


def write_section(name: str, body: str, doc: Path = DOC) -> Path:
    """Replace (or append) the ``name`` section of ``doc``; returns ``doc``."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    text = doc.read_text() if doc.exists() else HEADER
    block = f"{start}\n{body.rstrip()}\n{end}"
    if start in text and end in text:
        text = text[: text.index(start)] + block + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(text)
    return doc
