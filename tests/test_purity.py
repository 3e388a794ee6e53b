import json
import pkgutil
import subprocess
import sys

import tlcore

FORBIDDEN = ("prefect", "ray", "dvc", "mlflow")


def test_tlcore_imports_no_orchestration_packages():
    mods = ["tlcore"] + [f"tlcore.{m.name}" for m in pkgutil.iter_modules(tlcore.__path__)]
    code = (
        "import importlib, json, sys\n"
        f"for m in {mods!r}: importlib.import_module(m)\n"
        f"print(json.dumps(sorted(k for k in sys.modules if k.split('.')[0] in {FORBIDDEN!r})))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []
    assert len(mods) >= 9
