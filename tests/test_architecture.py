"""The house: every module of `tasks/` lives in the folder of its role, and dependencies point one way.

    tasks.cli  ->  flows  ->  tasks.stages  ->  tasks.modeling  ->  tasks.services  ->  tasks.project  ->  tlcore

A package may import its own modules and any package to its right, never one to its left, so the package
graph has no cycle. Read from the source (``ast``, lazy imports included), so nothing is imported to check it.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys

from helpers import ROOT

ORDER = ["tasks.cli", "flows", "tasks.stages", "tasks.modeling", "tasks.services", "tasks.project", "tlcore"]
RANK = {p: i for i, p in enumerate(ORDER)}
PROJECT = ("tasks", "flows", "tlcore", "bench")


def _modules() -> dict[str, ast.Module]:
    out = {}
    for top in PROJECT:
        for f in sorted((ROOT / top).rglob("*.py")):
            name = ".".join(f.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
            out[name] = ast.parse(f.read_text(), str(f))
    return out


MODULES = _modules()


def _imports(mod: str, tree: ast.Module) -> set[str]:
    """Dotted names imported by ``mod`` (relative imports resolved; ``from a import b`` counts ``a.b`` when it is a
    module, else ``a``)."""
    is_pkg = (ROOT / mod.replace(".", "/") / "__init__.py").is_file()
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = mod.split(".") if is_pkg else mod.split(".")[:-1]
                parts = parts[: len(parts) - (node.level - 1)]
                base = ".".join(parts + ([base] if base else []))
            for a in node.names:
                out.add(f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base)
    return out


def _package(mod: str) -> str | None:
    return next((p for p in sorted(RANK, key=len, reverse=True) if mod == p or mod.startswith(p + ".")), None)


def test_every_tasks_module_lives_in_a_role_folder():
    loose = [m for m in MODULES if m.count(".") == 1 and m.startswith("tasks.") and m not in RANK]
    assert loose == [], f"modules directly in tasks/ (give each a role folder: {ORDER}): {loose}"
    stages = {
        ln.split("python -m ")[1].strip()
        for ln in (ROOT / "dvc.yaml").read_text().splitlines()
        if "cmd: python -m " in ln
    }
    assert stages == {m for m in MODULES if m.startswith("tasks.stages.") and m != "tasks.stages"}, (
        "tasks/stages/ holds exactly the dvc.yaml stages"
    )


def test_dependencies_point_one_way():
    wrong = []
    for mod, tree in MODULES.items():
        src = _package(mod)
        if src is None:  # bench/ sits beside the house and may use any of it
            continue
        for target in _imports(mod, tree):
            dst = _package(target)
            if dst is not None and RANK[dst] < RANK[src]:
                wrong.append(f"{mod} -> {target}")
            if src == dst == "tasks.stages" and target != "tasks.stages" and mod != target:
                wrong.append(f"stage imports another stage: {mod} -> {target}")
    assert wrong == [], "imports against the direction " + " -> ".join(ORDER) + ":\n" + "\n".join(sorted(wrong))


def test_the_direction_check_catches_a_backward_import():
    tree = ast.parse("from tasks.cli.main import app\nfrom tasks.project import config\n")
    backward = [t for t in _imports("tasks.services.registry", tree) if RANK[_package(t)] < RANK["tasks.services"]]
    assert backward == ["tasks.cli.main"]


def test_no_private_module_of_a_dependency_is_imported():
    private = sorted(
        f"{mod} -> {t}"
        for mod, tree in MODULES.items()
        for t in _imports(mod, tree)
        if t.split(".")[0] not in PROJECT and t != "__future__" and any(part.startswith("_") for part in t.split("."))
    )
    assert private == [], f"private modules of dependencies (use their public API): {private}"


def test_importing_the_project_writes_no_environment_variable():
    mods = sorted(m for m in MODULES if not m.startswith("bench"))
    # dependencies may set variables when imported (torch sets KMP_*): import them first, then take the snapshot
    deps = sorted({t.split(".")[0] for m in mods for t in _imports(m, MODULES[m])} - set(PROJECT) - {"__future__"})
    code = (
        "import importlib, json, os\n"
        f"for d in {deps!r}:\n"
        "    try: importlib.import_module(d)\n"
        "    except ImportError: pass\n"
        "before = dict(os.environ)\n"
        f"for m in {mods!r}: importlib.import_module(m)\n"
        "after = dict(os.environ)\n"
        "print(json.dumps(sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))))\n"
    )
    from tasks.project.env import QUIET_ENV

    env = {k: v for k, v in os.environ.items() if k not in QUIET_ENV}  # what an entry point would set is unset
    env["PATH"] = "/usr/bin:/bin"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env, check=True)
    changed = json.loads(out.stdout.strip().splitlines()[-1])
    assert changed == [], f"importing the project changed these environment variables: {changed}"


def test_the_readme_layout_names_every_module_in_its_folder():
    import re

    readme = (ROOT / "README.md").read_text()
    block = readme[readme.index("## Layout") :]
    block = block[block.index("```") + 3 :]
    block = block[: block.index("```")]
    entries, cur = {}, None
    for line in block.splitlines():
        head = re.match(r"^(\S+/)\s", line)
        if head:
            cur = head.group(1).rstrip("/")
        if cur:
            entries[cur] = entries.get(cur, "") + " " + line
    missing = []
    for folder in [
        "tlcore",
        *(f"tasks/{p.name}" for p in sorted((ROOT / "tasks").iterdir()) if (p / "__init__.py").exists()),
    ]:
        words = set(re.findall(r"[a-z_]+", entries.get(folder, "")))
        missing += [
            f"{folder}/{f.name}"
            for f in sorted((ROOT / folder).glob("*.py"))
            if f.stem != "__init__" and f.stem not in words
        ]
    assert missing == [], f"modules the README's Layout does not name: {missing}"
