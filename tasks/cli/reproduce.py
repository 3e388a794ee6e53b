"""``tl reproduce NAME/VERSION``: replay a registered model from its lineage and say whether it matches.

From the version's MLflow record: check out its git commit into a fresh folder (a clone; the user's
checkout is never touched), put back the params and the ``dvc.lock`` it was made with, pull its data
from the DVC remote by hash, rerun ``pretrain`` → ``evaluate`` with ``--force``, and compare the
metrics and the per-image predictions with the original. Optionally register the replay as a
version tagged ``reproduces=<version>`` (it never becomes champion).
"""

from __future__ import annotations

import csv
import json
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from tasks.project.env import dvc, pin_remotes
from tasks.project.files import file_sha256, read_json
from tasks.project.stage import StageError, say  # progress to stderr: stdout is the comparison (--json parses)
from tasks.services.tracking import client, experiment_id, project_root, tracking_uri, version_by_alias

REPLAY_STAGES = ("pretrain", "finetune", "baselines", "evaluate")
COMPARED = ("accuracy", "macro_f1", "ece", "scratch_accuracy", "source_only_accuracy", "transfer_gain")
# changes that do not make a run irreproducible: the replay restores these from the registry
RESTORED = {"params.yaml", "dvc.lock"}


class ReproduceError(StageError):
    """The version cannot be replayed; the message says why and what to do."""


def parse_spec(spec: str) -> tuple[str, str | None, str | None]:
    """``NAME/VERSION`` or ``NAME@alias`` -> (name, version, alias)."""
    m = re.fullmatch(r"(.+?)(?:/(\d+)|@([\w-]+))", spec.strip())
    if not m:
        raise ReproduceError(
            f"{spec!r} is not NAME/VERSION or NAME@alias (e.g. digits-transfer/3, digits-transfer@champion)."
        )
    return m.group(1), m.group(2), m.group(3)


def uncommitted_code(tags: dict) -> list[str] | None:
    """The changed paths recorded on a version (``git_dirty_paths``) that the replay cannot put back: all but
    :data:`RESTORED`; ``[]`` for a clean tree, ``None`` when the tree was dirty but the paths were not recorded."""
    if tags.get("git_dirty") != "true":
        return []
    if "git_dirty_paths" not in tags:
        return None
    return [p for p in tags["git_dirty_paths"].split(",") if p and p not in RESTORED]


def _version(c, spec: str):
    from mlflow.exceptions import MlflowException

    name, number, alias = parse_spec(spec)
    v = version_by_alias(c, name, alias) if alias else None
    if number:
        try:
            v = c.get_model_version(name, number)
        except MlflowException:
            v = None
    if v is None:
        raise ReproduceError(f"no model version {spec} in {tracking_uri()}; see `tl models`.")
    return name, v


def _git(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True)


def _artifact(run_id: str, path: str, dst: Path, what: str) -> Path:
    import mlflow

    try:
        got = Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path, tracking_uri=tracking_uri()))
    except Exception as e:  # noqa: BLE001 - an MlflowException or an unreachable artifact store
        raise ReproduceError(
            f"the run {run_id} has no {what} ({path}: {e}); it was registered before replays were "
            f"recorded, or its artifacts are gone."
        ) from None
    shutil.copy2(got, dst)
    return dst


def _predictions(path: Path) -> list[str]:
    with path.open() as f:
        return [r["predicted"] for r in csv.DictReader(f)]


def _checkout(root: Path, commit: str, work: Path) -> None:
    r = _git("clone", "-q", "--no-checkout", str(root), str(work), cwd=root)
    if r.returncode != 0:
        raise ReproduceError(f"cannot clone {root} into {work}: {r.stderr.strip()}")
    r = _git("checkout", "-q", commit, cwd=work)
    if r.returncode != 0:
        raise ReproduceError(f"commit {commit} is not in {root} ({r.stderr.strip()}); fetch or pull it first.")
    pin_remotes(root, work)  # the remotes the user pushed to, as their checkout sees them (a relative path too)


def _pull_data(work: Path) -> None:
    import yaml

    stages = (yaml.safe_load((work / "dvc.lock").read_text()) or {}).get("stages", {})
    r = dvc(["pull", *[s for s in ("inputs", "data") if s in stages]], work, capture=True)
    if r.returncode != 0:
        out = r.stdout + r.stderr
        missing = sorted(set(re.findall(r"(?:md5|file|path)[: ]+'?([^\s']+)'?", out)))[:5]
        raise ReproduceError(
            "cannot restore the version's data from the DVC remote: `dvc pull data` failed"
            + (f" (missing: {', '.join(missing)})" if missing else "")
            + f":\n{out.strip()[-1500:]}\n"
            "Push the data from the machine that made the model (`dvc push`), or configure the remote "
            "(`dvc remote list`)."
        )


def reproduce(
    spec: str,
    tolerance: float = 0.003,
    register: bool = False,
    allow_dirty: bool = False,
    workdir: str | Path | None = None,
    keep: bool = False,
) -> dict:
    """Replay ``spec``; returns the comparison (``ok``: accuracy within ``tolerance``)."""
    root = project_root()
    c = client()
    name, v = _version(c, spec)
    tags = v.tags
    commit = tags.get("git_commit", "unknown")
    if commit in ("", "unknown"):
        raise ReproduceError(f"{name} version {v.version} records no git commit; it cannot be replayed.")
    dirty = uncommitted_code(tags)
    if dirty != [] and not allow_dirty:
        raise ReproduceError(
            f"{name} version {v.version} was made from a work tree with uncommitted changes "
            f"({', '.join(dirty[:8]) if dirty else 'which files is not recorded'}) on top of {commit[:10]}: the "
            f"commit alone does not hold its code. Pass --allow-dirty to replay the commit anyway (expect differences)."
        )
    work = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix=f"tl-reproduce-{name}-v{v.version}-"))
    if workdir and work.exists() and any(work.iterdir()):
        raise ReproduceError(f"--workdir {work} is not empty; give a new folder.")
    t0 = time.time()
    try:
        say(f"reproduce: {name} version {v.version} from commit {commit[:10]} in {work}", err=True)
        _checkout(root, commit, work)
        _artifact(v.run_id, "model/params.yaml", work / "params.yaml", "resolved params")
        _artifact(v.run_id, "lineage/dvc.lock", work / "dvc.lock", "dvc.lock")
        say("reproduce: restoring the data from the DVC remote", err=True)
        _pull_data(work)
        for stage in REPLAY_STAGES:
            say(f"reproduce: {stage}", err=True)
            r = dvc(["repro", "--single-item", "--force", stage], work, capture=True)
            if r.returncode != 0:
                raise ReproduceError(f"the replay's {stage} stage failed:\n{(r.stderr or r.stdout).strip()[-2000:]}")
        replay = read_json(work / "reports" / "metrics.json")
        original = c.get_run(v.run_id).data.metrics
        rows = [
            {
                "metric": k,
                "original": original.get(k),
                "replay": replay.get(k),
                "delta": (replay[k] - original[k]) if replay.get(k) is not None and k in original else None,
            }
            for k in COMPARED
            if k in original or replay.get(k) is not None
        ]
        orig_pred = _predictions(
            _artifact(v.run_id, "reports/predictions.csv", work / "original_predictions.csv", "predictions")
        )
        new_pred = _predictions(work / "reports" / "predictions.csv")
        same = sum(a == b for a, b in zip(orig_pred, new_pred)) if len(orig_pred) == len(new_pred) else None
        delta = abs(replay["accuracy"] - original["accuracy"])
        out = {
            "model_name": name,
            "version": int(v.version),
            "commit": commit,
            "workdir": str(work),
            "rows": rows,
            "identical_predictions": same,
            "test_images": len(new_pred),
            "ok": delta <= tolerance + 1e-12,
            "tolerance": tolerance,
            "seconds": round(time.time() - t0, 1),
            "model_sha256_match": file_sha256(work / "models" / "finetuned.pt") == tags.get("model_sha256"),
            "precision": _precision(tags, work),
        }
        if register:
            out["registered_version"] = _register_replay(c, name, v, work, replay, out)
        return out
    finally:
        if not keep and not workdir:
            shutil.rmtree(work, ignore_errors=True)


def _precision(tags: dict, work: Path) -> dict:
    """The finetune precision of the original and of the replay, and on which CPU each was chosen: with
    ``precision: auto`` it is measured on (and cached per) the machine that trains, not carried by the lineage."""
    from tasks.modeling.hardware import cpu_model

    rep = work / "reports" / "finetune.json"
    return {
        "original": tags.get("finetune_precision"),
        "replay": read_json(rep).get("precision") if rep.is_file() else None,
        "original_cpu": tags.get("env_cpu"),
        "replay_cpu": cpu_model(),
    }


def _register_replay(c, name: str, v, work: Path, metrics: dict, result: dict) -> int:
    """Log the replay as a run and a version tagged ``reproduces=<version>``; no alias moves."""
    exp = experiment_id(c, "transfer-pipeline-replays")
    run = c.create_run(exp, tags={"reproduces": f"{name}/{v.version}", "git_commit": result["commit"]})
    for k, val in metrics.items():
        if isinstance(val, (int, float)) and not isinstance(val, bool):
            c.log_metric(run.info.run_id, k, float(val))
    c.log_artifact(run.info.run_id, str(work / "models" / "finetuned.pt"), "model")
    c.log_artifact(run.info.run_id, str(work / "params.yaml"), "model")
    c.set_terminated(run.info.run_id)
    mv = c.create_model_version(
        name,
        source=f"{run.info.artifact_uri}/model",
        run_id=run.info.run_id,
        tags={
            "reproduces": str(v.version),
            "accuracy": str(metrics["accuracy"]),
            "gate_decision": "replay",
            "model_sha256": file_sha256(work / "models" / "finetuned.pt"),
            "registration": "complete",
            "identical_predictions": f"{result['identical_predictions']}/{result['test_images']}",
            "strategy": v.tags.get("strategy", ""),
            "git_commit": result["commit"],
        },
    )
    return int(mv.version)


def table(result: dict) -> str:
    """The side-by-side comparison, for people."""

    def f(x, signed=False):
        return "n/a" if x is None else (f"{x:+.4f}" if signed else f"{x:.4f}")

    lines = [f"{'metric':<22}{'original':>10}{'replay':>10}{'delta':>10}"]
    for r in result["rows"]:
        lines.append(f"{r['metric']:<22}{f(r['original']):>10}{f(r['replay']):>10}{f(r['delta'], True):>10}")
    same, n = result["identical_predictions"], result["test_images"]
    lines.append(
        f"identical predictions: {'n/a' if same is None else f'{same}/{n}'}; "
        f"model file identical: {'yes' if result['model_sha256_match'] else 'no'}"
    )
    p = result.get("precision") or {}
    if p.get("original") or p.get("replay"):
        where = (
            "the same CPU model"
            if p.get("original_cpu") == p.get("replay_cpu")
            else f"another machine: {p.get('replay_cpu')} (the original: {p.get('original_cpu') or 'not recorded'})"
        )
        lines.append(
            f"precision: original {p.get('original') or 'n/a'}, replay {p.get('replay') or 'n/a'}, chosen again on "
            f"{where}; precision: auto is measured per machine, so another machine may train in another precision"
        )
    return "\n".join(lines)


def summary_json(result: dict) -> str:
    return json.dumps(result, indent=2, default=str)
