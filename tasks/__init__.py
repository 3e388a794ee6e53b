"""The project's code around `tlcore`, one folder per role: `stages/` (the `dvc.yaml` stages), `cli/` (the `tl`
command), `services/`, `modeling/` and `project/` (see the README's Layout)."""

import importlib.util as _util
import sys as _sys

_missing = [m for m in ("torch", "pydantic", "yaml") if _util.find_spec(m) is None]
if _missing:  # e.g. `dvc repro` from a shell where the venv is not active runs the system python
    raise SystemExit(
        f"error: {_sys.executable} has no {', '.join(_missing)}, so it is not this project's Python environment. "
        f"Activate the project's virtual environment first (`source .venv/bin/activate`; `make install` creates it), "
        f"then run the command again."
    )
