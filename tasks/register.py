"""Stage ``register``: log the run to MLflow, register the model, and gate promotion to ``champion``.

The new version always gets alias ``challenger``. It becomes ``champion`` only if it passes the
gate in ``params.register``: accuracy >= ``min_accuracy``; >= the current champion's accuracy
(measured on the same test data) + ``min_improvement``; and, when
``require_positive_transfer``, a positive transfer gain over training from scratch. The
decision and its reasons are printed and stored as tags. The model is stored as a state_dict
checkpoint (loaded with ``weights_only=True`` plus its registry name), never as a pickle.
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import yaml

from .common import file_sha256, git_info, params_hash, read_json, say, stage_main, write_json
from .config import Params
from .registry import refresh
from .tracking import client, experiment_id, tracking_uri, version_by_alias


def dvc_lineage(lock_path: str | Path = "dvc.lock", manifest: dict | None = None) -> dict[str, str]:
    """DVC content hashes of the data directories (from ``dvc.lock``), plus the manifest's split hashes."""
    tags = {}
    lock = Path(lock_path)
    if lock.is_file():
        with lock.open() as f:
            stages = (yaml.safe_load(f) or {}).get("stages", {})
        for out in stages.get("data", {}).get("outs", []):
            role = Path(out["path"]).name
            if role in ("source", "target"):
                tags[f"data_{role}_dvc_md5"] = out.get("md5", "")
    for role in ("source", "target"):
        for split, info in (manifest or {}).get(role, {}).get("splits", {}).items():
            tags[f"data_{role}_{split}_sha256"] = info["sha256"]
    return tags


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def champion_accuracy_on(c, name: str, test_hash: str, params: Params) -> tuple[object | None, float | None]:
    """The current champion version and its accuracy on *this* test split."""
    champ = version_by_alias(c, name, "champion")
    if champ is None:
        return None, None
    if champ.tags.get("data_target_test_sha256") == test_hash:
        return champ, float(champ.tags["accuracy"])
    return champ, evaluate_version(c, champ, params)  # other test data: measure it here


def evaluate_version(c, version, params: Params) -> float:
    import mlflow

    from tlcore import data, metrics

    from .common import load_checkpoint, load_domain

    path = Path(mlflow.artifacts.download_artifacts(version.source, tracking_uri=tracking_uri())) / "model.pt"
    model, meta = load_checkpoint(path)
    _, test_ds = load_domain(params, "target", meta["arch"])
    return metrics.accuracy(model, data.make_loader(test_ds, 256, train=False), "cpu")


def gate(params: Params, metrics: dict, champion_acc: float | None) -> tuple[bool, list[str]]:
    """The promotion decision and a reason per rule (each reason says pass/fail)."""
    r = params.register
    acc, ok, reasons = metrics["accuracy"], True, []
    good = acc >= r.min_accuracy
    ok &= good
    reasons.append(f"{'pass' if good else 'FAIL'}: accuracy {acc:.4f} {'>=' if good else '<'} min_accuracy {r.min_accuracy}")
    if champion_acc is None:
        reasons.append("pass: no current champion")
    else:
        need = champion_acc + r.min_improvement
        good = acc >= need
        ok &= good
        reasons.append(f"{'pass' if good else 'FAIL'}: accuracy {acc:.4f} {'>=' if good else '<'} champion "
                       f"{champion_acc:.4f} + min_improvement {r.min_improvement}")
    if r.require_positive_transfer:
        gain, over = metrics["transfer_gain"], metrics.get("gain_baseline", "scratch")
        if gain is None:
            reasons.append("pass: no baseline applies (no target labels for scratch, and different label sets "
                           "for source_only)")
        else:
            good = gain > 0
            ok &= good
            reasons.append(f"{'pass' if good else 'FAIL'}: transfer_gain {gain:+.4f} {'>' if good else '<='} 0 "
                           f"(over {over} {metrics[over + '_accuracy']:.4f})")
    return ok, reasons


def register(params: Params) -> dict:
    import mlflow

    c = client()
    mlflow.set_tracking_uri(tracking_uri())  # the fluent run API below; this stage is its own process
    name = params.register.model_name
    metrics = read_json(params.path("reports", "metrics.json"))
    compress = read_json(params.path("reports", "compress.json")) if params.path("reports", "compress.json").is_file() else {}
    manifest = read_json(params.path("data", "manifest.json"))
    lineage = {**git_info(), **dvc_lineage("dvc.lock", manifest), "params_hash": params_hash(params),
               "model_sha256": file_sha256(params.path("models", "finetuned.pt"))}
    exp_id = experiment_id(c, params.register.experiment)
    staged = Path(tempfile.mkdtemp(prefix="tl-model-"))
    try:
        shutil.copy2(params.path("models", "finetuned.pt"), staged / "model.pt")
        (staged / "params.yaml").write_text(yaml.safe_dump(params.model_dump(), sort_keys=False))
        with mlflow.start_run(experiment_id=exp_id) as run:
            mlflow.log_params({k: str(v)[:500] for k, v in _flatten(params.model_dump()).items()})
            mlflow.log_metrics({k: float(v) for k, v in {**metrics, **_flatten(compress)}.items()
                                if isinstance(v, (int, float)) and v is not None})
            mlflow.set_tags(lineage)
            mlflow.log_artifacts(str(staged), artifact_path="model")
            if params.path("reports").is_dir():
                mlflow.log_artifacts(str(params.path("reports")), artifact_path="reports")
            source_uri = f"{run.info.artifact_uri}/model"
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    if not c.search_registered_models(filter_string=f"name = '{name}'"):
        c.create_registered_model(name, description="Transferred classifier registered by the transfer pipeline.")
    champ, champ_acc = champion_accuracy_on(c, name, lineage.get("data_target_test_sha256", ""), params)
    promoted, reasons = gate(params, metrics, champ_acc)
    tags = {**lineage, "accuracy": str(metrics["accuracy"]), "transfer_gain": str(metrics["transfer_gain"]),
            "gain_baseline": str(metrics.get("gain_baseline")),
            "strategy": params.finetune.strategy, "backbone": params.pretrain.backbone,
            "gate_decision": "promoted" if promoted else "rejected", "gate_reasons": "; ".join(reasons),
            **({"previous_champion": str(champ.version)} if promoted and champ else {})}
    mv = c.create_model_version(name, source=source_uri, run_id=run.info.run_id, tags=tags)
    c.set_registered_model_alias(name, "challenger", mv.version)
    if promoted:
        c.set_registered_model_alias(name, "champion", mv.version)
    say(f"register: {name} version {mv.version} -> {'champion' if promoted else 'challenger only (not promoted)'}")
    for r in reasons:
        say(f"register:   {r}")
    out = {"model_name": name, "version": int(mv.version), "promoted": promoted, "reasons": reasons,
           "run_id": run.info.run_id, "model_uri": f"models:/{name}/{mv.version}",
           "previous_champion": int(champ.version) if champ else None, "tracking_uri": tracking_uri(), **lineage}
    write_json(params.path("reports", "registration.json"), out)
    refresh(name, c)  # `tl models` right after a run reads the cache instead of starting MLflow
    return out


if __name__ == "__main__":
    stage_main(register)
