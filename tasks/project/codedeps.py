"""Which files are a stage's code: the one definition that ``dvc.yaml`` and a Ray run's code hash can share.

A stage ``tasks.stages.<stage>`` runs the modules of its import closure inside ``tasks/`` (function-level,
lazy imports included) plus ``tlcore``. ``dvc.yaml`` lists exactly these as the stage's code deps
(``tests/test_dvc_deps.py`` checks it with :func:`stage_code_files`), so a code change reruns
exactly the stages that execute it. Found by reading the source (``ast``), never by importing it.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _module_file(module: str, root: Path) -> Path:
    return root / (module.replace(".", "/") + ".py")


def import_closure(module: str, root: Path = ROOT) -> set[str]:
    """Dotted names of the ``tasks`` modules ``module`` imports, directly or not, itself included."""
    seen: set[str] = set()

    def visit(mod: str) -> None:
        path = _module_file(mod, root)
        if mod in seen or not path.is_file():
            return
        seen.add(mod)
        for node in ast.walk(ast.parse(path.read_text(), str(path))):  # lazy (in-function) imports count too
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: resolved against the importing module's package
                    pkg = mod.split(".")[: -node.level]
                    base = ".".join(pkg + ([base] if base else []))
                if base.split(".")[0] == "tasks":
                    visit(base)
                    for a in node.names:  # `from tasks.modeling import train`
                        visit(f"{base}.{a.name}")
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.split(".")[0] == "tasks":
                        visit(a.name)

    visit(module)
    return seen


def stage_code_files(stage: str, root: Path = ROOT) -> list[Path]:
    """The files whose code ``python -m tasks.stages.<stage>`` runs: its import closure in ``tasks/`` plus every
    ``tlcore/**/*.py``, sorted. ``dvc.yaml`` declares the same set (``tlcore`` as a directory).
    The packages' ``__init__.py`` files (an environment check, docstrings) are left out, as in ``dvc.yaml``."""
    mods = import_closure(f"tasks.stages.{stage}", root)
    if f"tasks.stages.{stage}" not in mods:
        raise FileNotFoundError(f"no stage module {_module_file(f'tasks.stages.{stage}', root)}")
    return sorted(_module_file(m, root) for m in mods) + sorted((root / "tlcore").rglob("*.py"))
