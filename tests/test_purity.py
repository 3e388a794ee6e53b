import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import tlcore

FORBIDDEN = ("prefect", "ray", "dvc", "mlflow")


def test_tlcore_imports_no_orchestration_packages():
    mods = ["tlcore"] + [f"tlcore.{m.name}" for m in pkgutil.iter_modules(tlcore.__path__)]
    code = (
        "import importlib, json, sys\n"
        f"for m in {mods!r}: importlib.import_module(m)\n"
        f"print(json.dumps(sorted(k for k in sys.modules if k.split('.')[0] in {FORBIDDEN!r})))\n"
        "print(json.dumps(sorted(k for k in sys.modules if k.split('.')[0] == 'tlcore')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    forbidden, imported = (json.loads(line) for line in out.stdout.strip().splitlines()[-2:])
    assert forbidden == []
    files = {"tlcore"} | {f"tlcore.{f.stem}" for f in Path(tlcore.__file__).parent.glob("*.py") if f.stem != "__init__"}
    assert set(imported) == files  # every module of tlcore was imported, and checked
