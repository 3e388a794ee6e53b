"""`dvc.yaml` is computed from the code, not kept by hand, and these tests hold it to that:

- each stage's code deps are the files it runs (its import closure in `tasks/`, plus `tlcore`), the one
  definition in :func:`tasks.project.codedeps.stage_code_files`;
- each stage's params are the params it reads: read from its entry function and everything that
  function reaches, found by reading the source (``ast``), no pipeline run.
"""

from __future__ import annotations

import ast
from functools import cache

import pytest
import yaml
from helpers import ROOT

from tasks.project import config
from tasks.project.codedeps import import_closure, stage_code_files

STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


@pytest.mark.parametrize("stage", list(STAGES))
def test_stage_code_deps_are_its_import_closure(stage):
    spec = STAGES[stage]
    assert spec["cmd"] == f"python -m tasks.stages.{stage}"
    needed = {
        p.relative_to(ROOT).as_posix() for p in stage_code_files(stage) if p.relative_to(ROOT).parts[0] == "tasks"
    }
    listed = {d for d in spec["deps"] if d.startswith("tasks/")}
    assert needed - listed == set(), f"{stage}: imports but does not declare {sorted(needed - listed)}"
    assert listed - needed == set(), f"{stage}: declares but never imports {sorted(listed - needed)}"
    assert "tlcore" in spec["deps"]  # every stage runs tlcore code


def test_stage_code_files_are_the_closure_plus_tlcore():
    files = stage_code_files("data")
    assert (
        ROOT / "tasks/stages/data.py" in files
        and ROOT / "tasks/project/config.py" in files
        and ROOT / "tlcore/data.py" in files
    )
    assert ROOT / "tasks/modeling/ray_train.py" not in files  # another stage's helper
    assert {
        "tasks.stages.pretrain",
        "tasks.modeling.train",
        "tasks.modeling.ray_train",
        "tasks.modeling.checkpoints",
        "tasks.project.config",
    } <= import_closure("tasks.stages.pretrain")


# --------------------------------------------------------------------------- params each stage reads
# What a stage reads is what may change its outputs, so `dvc.yaml` must declare it (else DVC keeps a stale
# result), and nothing more (else DVC reruns a stage for a param it ignores). Rules of the analysis:
# - a read is `params.<section>.<key>`, or `<alias>.<key>` after `alias = params.<section>`;
# - `params` handed to a project function is followed into it (its argument is `params` or typed `Params`);
# - a section handed on whole counts as the fields of the type it is received as (`TrainJob.optim: Optim`
#   reads the Optim fields of `finetune`, not `strategy`), else as the whole section;
# - `params.model_dump()` and `params` handed to code outside the project read everything;
# - `params.path(...)` reads base.*_dir, which dvc.yaml already names through `${base.*_dir}` in deps/outs;
# - tasks/project/config.py is validation (run by every stage on every param), not a read; so is
#   tasks/project/overrides.py, which applies `-S key=value` to the raw mapping before it is validated.
NOT_READS = {"tasks.project.config", "tasks.project.overrides"}  # modules not followed
SECTIONS = {name: f.annotation for name, f in config.Params.model_fields.items()}
FIELDS = {s: set(cls.model_fields) for s, cls in SECTIONS.items()}
ALL = frozenset((s, k) for s, ks in FIELDS.items() for k in ks)
TYPES = {n: c for n, c in vars(config).items() if isinstance(c, type) and issubclass(c, config._Section)}
# Params that say where and how robustly to run, not what is computed: changing them must not rerun a stage.
# (ray.num_workers, use_gpu and cpus_per_worker do change it: the batch split, the device, the threads.)
# data.loader_workers: the batches do not depend on it (tests/test_engine.py trains alike with 0 and 1).
# data.hold_in_memory_mib: held or streamed, the pixels are the same.
EXECUTION_ONLY = {
    ("ray", "address"),
    ("ray", "storage_path"),
    ("ray", "max_failures"),
    ("ray", "gpus_per_worker"),
    ("data", "loader_workers"),
    ("data", "hold_in_memory_mib"),  # the same pixels held or streamed (tests/test_shards.py)
}
# Read through params.path(...): dvc.yaml names them as ${base.*_dir} in deps and outs, so DVC sees them.
DIRS = {("base", "data_dir"), ("base", "models_dir"), ("base", "reports_dir")}
# Functions whose reads do not reach a stage's outputs. run_name hashes params only to name a Ray run
# (its resume key); it hashes every section but register/evaluate/compress, whatever the stage.
NOT_OUTPUT = {"tasks.services.ray_runs.run_name"}
# Params no stage reads: each is a bug (wire it or remove it); the test below fails when this list is stale.
KNOWN_UNREAD: set = set()
# Sections mostly read by a command: `tune` is `tl tune`'s search space (the finetune stage declares the three keys
# it reads, for finetune.strategy auto with no target labels), so its other keys are read by no stage.
COMMAND_SECTIONS = {"tune"}


def _whole(section: str) -> set:
    return {(section, k) for k in FIELDS[section]}


@cache
def _module(mod: str):
    path = ROOT / (mod.replace(".", "/") + ".py")
    tree = ast.parse(path.read_text(), str(path))
    defs = {n.name: n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))}
    imports = {}
    for n in ast.walk(tree):  # lazy (in-function) imports too
        if isinstance(n, ast.ImportFrom) and (n.module or "").startswith("tasks"):
            base = n.module
            for a in n.names:
                imports[a.asname or a.name] = f"{base}.{a.name}"
    return defs, imports


def _unit(qual: str):
    mod, _, name = qual.rpartition(".")
    if mod in NOT_READS or not (ROOT / (mod.replace(".", "/") + ".py")).is_file():
        return None
    return _module(mod)[0].get(name)


def _resolve(mod: str, name: str) -> str | None:
    defs, imports = _module(mod)
    qual = f"{mod}.{name}" if name in defs else imports.get(name)
    return qual if qual and _unit(qual) is not None else None


def _is_params_arg(a: ast.arg) -> bool:
    ann = a.annotation
    return (
        a.arg == "params"
        or (isinstance(ann, ast.Name) and ann.id == "Params")
        or (isinstance(ann, ast.Constant) and ann.value == "Params")
    )


def _received_as(mod: str, call: ast.Call, arg: ast.AST) -> ast.AST | None:
    """The parameter (``ast.arg``) or dataclass field (``ast.AnnAssign``) of a project callee that ``arg`` binds to."""
    if not isinstance(call.func, ast.Name) or (qual := _resolve(mod, call.func.id)) is None:
        return None
    node = _unit(qual)
    if isinstance(node, ast.ClassDef):
        slots = [(s.target.id, s) for s in node.body if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name)]
    else:
        slots = [(a.arg, a) for a in [*node.args.posonlyargs, *node.args.args, *node.args.kwonlyargs]]
    if arg in call.args:
        i = call.args.index(arg)
        return slots[i][1] if i < len(slots) else None
    kw = next(k.arg for k in call.keywords if k.value is arg)
    return dict(slots).get(kw)


def _call_of(parents: dict, node: ast.AST) -> ast.Call | None:
    p = parents.get(node)
    if isinstance(p, ast.keyword):
        p = parents.get(p)
    return p if isinstance(p, ast.Call) and node is not p.func else None


def _unit_reads(qual: str) -> tuple[set, set]:
    """(keys read one by one, keys read in bulk) by one top-level function or class."""
    mod = qual.rpartition(".")[0]
    node = _unit(qual)
    if qual in NOT_OUTPUT:
        return set(), set()
    parents = {c: p for p in ast.walk(node) for c in ast.iter_child_nodes(p)}
    names = {a.arg for a in ast.walk(node) if isinstance(a, ast.arg) and _is_params_arg(a)}
    aliases, alias_values = {}, set()  # `cfg = params.compress`, `cfg, f = params.compress, params.finetune`
    for n in ast.walk(node):
        if isinstance(n, ast.Assign) and len(n.targets) == 1:
            pairs = (
                zip(n.targets[0].elts, n.value.elts)
                if isinstance(n.targets[0], ast.Tuple) and isinstance(n.value, ast.Tuple)
                else [(n.targets[0], n.value)]
            )
            for t, v in pairs:
                if (
                    isinstance(t, ast.Name)
                    and isinstance(v, ast.Attribute)
                    and isinstance(v.value, ast.Name)
                    and v.value.id in names
                    and v.attr in SECTIONS
                ):
                    aliases[t.id] = v.attr
                    alias_values.add(v)
    one, bulk = set(), set()

    def section_use(sec: str, expr: ast.AST) -> None:
        """``expr`` is section ``sec`` as a whole: a key read off it, or the section handed on."""
        p = parents.get(expr)
        if isinstance(p, ast.Attribute) and p.value is expr:
            (one.add((sec, p.attr)) if p.attr in FIELDS[sec] else bulk.update(_whole(sec)))
            return
        call = _call_of(parents, expr)
        slot = _received_as(mod, call, expr) if call is not None else None
        ann = getattr(slot, "annotation", None)
        typ = TYPES.get(ann.id) if isinstance(ann, ast.Name) else None
        one.update({(sec, k) for k in typ.model_fields} & _whole(sec) if typ else _whole(sec))

    for n in ast.walk(node):
        if not isinstance(n, ast.Name) or not isinstance(n.ctx, ast.Load):
            continue
        if n.id in aliases:
            section_use(aliases[n.id], n)
        elif n.id in names:
            p = parents.get(n)
            if isinstance(p, ast.Attribute) and p.value is n:
                if p.attr in SECTIONS:
                    if p not in alias_values:
                        section_use(p.attr, p)
                elif p.attr in ("model_dump", "model_dump_json"):
                    exclude = next(
                        (k.value for k in getattr(parents.get(p), "keywords", []) if k.arg == "exclude"), None
                    )
                    skip = set(ast.literal_eval(exclude)) if exclude is not None else set()
                    bulk.update(k for k in ALL if k[0] not in skip)
                elif p.attr != "path":
                    bulk.update(ALL)  # an unknown use: assume the worst
            else:
                call = _call_of(parents, n)
                slot = _received_as(mod, call, n) if call is not None else None
                if not (isinstance(slot, ast.arg) and _is_params_arg(slot)):
                    bulk.update(ALL)  # params handed to code the analysis does not follow
    return one, bulk


@cache
def stage_reads(stage: str) -> tuple[frozenset, frozenset]:
    """(keys read one by one, keys read in bulk) by ``python -m tasks.stages.<stage>``."""
    mod = f"tasks.stages.{stage}"
    tree = ast.parse((ROOT / f"tasks/stages/{stage}.py").read_text())
    entry = next(
        n.args[0].id for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", None) == "stage_main"
    )
    todo, seen = [f"{mod}.{entry}"], set()
    while todo:
        qual = todo.pop()
        if qual in seen:
            continue
        seen.add(qual)
        m = qual.rpartition(".")[0]
        for n in ast.walk(_unit(qual)):  # whatever the unit names it may run: calls, callbacks, classes
            if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load) and (q := _resolve(m, n.id)):
                todo.append(q)
    one, bulk = set(), set()
    for qual in seen:
        o, b = _unit_reads(qual)
        one |= o
        bulk |= b
    return frozenset(one), frozenset(bulk)


def declared(spec: dict) -> set:
    out = set()
    for item in spec.get("params", []):
        if isinstance(item, dict):  # `- params.yaml:` (all of the file) or `- params.yaml: [keys]`
            ((file, keys),) = item.items()
            assert file == "params.yaml"
            out |= set(ALL) if not keys else declared({"params": keys})
        else:
            sec, _, key = item.partition(".")
            out |= _whole(sec) if not key else {(sec, key.split(".")[0])}
    return out


@pytest.mark.parametrize("stage", list(STAGES))
def test_stage_params_are_the_params_it_reads(stage):
    one, bulk = stage_reads(stage)
    reads, decl = one | bulk, declared(STAGES[stage])
    missing = sorted(".".join(k) for k in reads - decl - EXECUTION_ONLY)
    unused = sorted(".".join(k) for k in decl - reads)
    assert not missing, f"{stage}: reads but does not declare {missing}: DVC would keep a stale result"
    assert not unused, f"{stage}: declares but never reads {unused}: DVC would rerun it for nothing"


def test_every_param_is_read_by_some_stage():
    read = set().union(*(stage_reads(s)[0] for s in STAGES))
    unread = {k for k in set(ALL) - read - DIRS if k[0] not in COMMAND_SECTIONS}
    assert unread == KNOWN_UNREAD, (
        f"params no stage reads: {sorted('.'.join(k) for k in unread)}; "
        f"KNOWN_UNREAD lists {sorted('.'.join(k) for k in KNOWN_UNREAD)}"
    )


def test_the_params_analysis_sees_what_matters():
    one, bulk = stage_reads("baselines")
    assert ("finetune", "lr") in one and ("finetune", "strategy") not in one | bulk  # TrainJob.optim: Optim
    assert ("ray", "num_workers") in one and not bulk  # run_name's model_dump is a resume key, not a read
    assert stage_reads("register")[1] == ALL  # params_hash / model_dump: everything
    assert {("data", "source"), ("data", "target")} <= stage_reads("data")[0]
