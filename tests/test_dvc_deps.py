"""`dvc.yaml` lists, for each stage, every project module the stage runs (its import closure in `tasks/`),
so a code change reruns exactly the stages that execute it. Computed from the code, not kept by hand."""
from __future__ import annotations

import ast

import pytest
import yaml

from helpers import ROOT

STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def _closure(module: str, seen: set[str]) -> set[str]:
    path = ROOT / (module.replace(".", "/") + ".py")
    if module in seen or not path.is_file():
        return seen
    seen.add(module)
    for node in ast.walk(ast.parse(path.read_text())):  # function-level (lazy) imports count too
        if isinstance(node, ast.ImportFrom):
            if node.level == 1:
                for target in ([f"tasks.{node.module}"] if node.module else [f"tasks.{a.name}" for a in node.names]):
                    _closure(target, seen)
            elif node.module and node.module.split(".")[0] == "tasks":
                _closure(node.module, seen)
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "tasks":
                    _closure(a.name, seen)
    return seen


@pytest.mark.parametrize("stage", list(STAGES))
def test_stage_code_deps_are_its_import_closure(stage):
    spec = STAGES[stage]
    assert spec["cmd"] == f"python -m tasks.{stage}"
    needed = {m.replace(".", "/") + ".py" for m in _closure(f"tasks.{stage}", set())}
    listed = {d for d in spec["deps"] if d.startswith("tasks/")}
    assert needed - listed == set(), f"{stage}: imports but does not declare {sorted(needed - listed)}"
    assert listed - needed == set(), f"{stage}: declares but never imports {sorted(listed - needed)}"
    assert "tlcore" in spec["deps"]  # every stage runs tlcore code
