"""Which files are a stage's code: the one definition that ``dvc.yaml`` and a Ray run's code hash can share.

A stage ``tasks.<stage>`` runs the modules of its import closure inside ``tasks/`` (function-level,
lazy imports included) plus ``tlcore``. ``dvc.yaml`` lists exactly these as the stage's code deps
(``tests/test_dvc_deps.py`` checks it with :func:`stage_code_files`), so a code change reruns
exactly the stages that execute it. Found by reading the source (``ast``), never by importing it.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


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
                if node.level == 1:
                    for target in ([f"tasks.{node.module}"] if node.module else [f"tasks.{a.name}" for a in node.names]):
                        visit(target)
                elif node.level == 0 and node.module and node.module.split(".")[0] == "tasks":
                    visit(node.module)
                    for a in node.names:  # `from tasks import files`
                        visit(f"{node.module}.{a.name}")
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.split(".")[0] == "tasks":
                        visit(a.name)

    visit(module)
    return seen


def stage_code_files(stage: str, root: Path = ROOT) -> list[Path]:
    """The files whose code ``python -m tasks.<stage>`` runs: its import closure in ``tasks/`` plus every
    ``tlcore/**/*.py``, sorted. ``dvc.yaml`` declares the same set (``tlcore`` as a directory).
    ``tasks/__init__.py`` (an environment check) is left out, as in ``dvc.yaml``."""
    mods = import_closure(f"tasks.{stage}", root)
    if f"tasks.{stage}" not in mods:
        raise FileNotFoundError(f"no stage module {_module_file(f'tasks.{stage}', root)}")
    return sorted(_module_file(m, root) for m in mods) + sorted((root / "tlcore").rglob("*.py"))
