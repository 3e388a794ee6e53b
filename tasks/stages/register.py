"""Stage ``register``: log the run to MLflow, register the model, and gate promotion to ``champion``.

The model is the run's candidate (:mod:`tasks.modeling.candidate`): the transfer model, or the ``scratch`` baseline
when it is more accurate on the validation images; which one and why are printed, tagged and written.

The new version gets alias ``challenger``; it becomes ``champion`` only if it passes the gate
(:mod:`tasks.modeling.gate`: a paired test against the champion and the baseline on the same test images).
The decision, its reasons and p-values are printed and stored as tags. The model is stored as a
state_dict checkpoint (loaded with ``weights_only=True``), never as a pickle.

Safe to repeat and to crash: a registration is keyed by the model file, params and data
(``registration_key``); a rerun reuses the finished run and the version instead of adding twins,
and completes whatever a crash left undone. Aliases move last, under the project lock and the registry
lock (held in the tracking store, so it holds across machines: `tasks/services/lock.py`), and only if
the champion is still the one the gate compared against (compare-and-set); otherwise the stage
fails with "champion changed during registration" and leaves the aliases alone.
"""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
import tempfile
from pathlib import Path

import yaml

from tasks.modeling.candidate import Candidate, choose, model_path
from tasks.modeling.gate import Decision, Paired, decide, paired
from tasks.modeling.serving import load_version
from tasks.project.config import Params
from tasks.project.files import file_sha256, read_json, write_json
from tasks.project.lineage import git_info, params_hash
from tasks.project.stage import StageError, say, stage_main
from tasks.services.lock import project_lock, registry_lock
from tasks.services.registry import cached, refresh
from tasks.services.tracking import (
    client,
    experiment_id,
    project_root,
    public_uri,
    tracking_uri,
    version_by_alias,
)

TRAIN_HASHES = "lineage/target_train_sha256.txt"  # run artifact: content hashes of the target training images
DVC_LOCK = "lineage/dvc.lock"  # run artifact: the dvc.lock this model was made with (what `tl reproduce` restores)


class RegistrationRaced(StageError):
    """The champion alias moved while the gate was deciding; nothing was changed."""


class ChampionUnavailable(StageError):
    """The champion's model cannot be downloaded or loaded, so the gate cannot re-measure it; nothing was promoted."""


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


def environment(params: Params) -> dict[str, str]:
    """What a replay needs to know about where this model was made: versions, hardware, precision, workers, seed."""
    import platform

    import torch

    from tasks.modeling.hardware import cpu_model

    reports = {
        s: read_json(params.path("reports", f"{s}.json")) if params.path("reports", f"{s}.json").is_file() else {}
        for s in ("pretrain", "finetune")
    }
    lock = Path("requirements.lock")
    env = {
        "env_python": platform.python_version(),
        "env_torch": torch.__version__,
        "env_cpu": cpu_model(),
        "env_gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
        "env_requirements_sha256": file_sha256(lock)[:16] if lock.is_file() else "",
        "seed": str(params.base.seed),
    }
    for stage, rep in reports.items():
        for k in ("precision", "workers", "threads_per_worker"):
            if rep.get(k) is not None:
                env[f"{stage}_{k}"] = str(rep[k])
    return env


def registration_key(lineage: dict) -> str:
    """Identity of a registration: the model file, the params and the data (not the git state or the time)."""
    ident = {k: v for k, v in lineage.items() if k in ("model_sha256", "params_hash") or k.startswith("data_")}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:24]


def image_hashes(split_dir: Path) -> list[str]:
    """Sorted SHA-256 of every image file of a prepared split (as the data stage read it from the user's
    folder): what "the same image" means."""
    from tlcore.shards import SplitIndex

    return sorted(SplitIndex.load(split_dir).sha256)


def new_model_correct(params: Params) -> list[bool]:
    """Per-image correctness of the new model on the test split, from the evaluate stage's predictions.csv."""
    with params.path("reports", "predictions.csv").open() as f:
        return [r["actual"] == r["predicted"] for r in csv.DictReader(f)]


def candidate_results(params: Params, cand: Candidate, metrics: dict, base: dict) -> tuple[float, list[bool]]:
    """The registration candidate's test accuracy and per-image correctness (test split order): the evaluate stage's
    for the transfer model, the baselines stage's for scratch."""
    if cand.is_scratch_baseline:
        return float(base["scratch_accuracy"]), [bool(x) for x in base["scratch_correct"]]
    return float(metrics["accuracy"]), new_model_correct(params)


def compare_with_champion(
    c, name: str, champ, params: Params, manifest: dict, test_hashes: set[str], new_correct: list[bool]
) -> Paired | str:
    """The champion re-measured on this run's test split, image by image, as it was trained (the size, crop,
    channels and normalisation its checkpoint records, not this run's); or why it cannot be compared fairly.
    Raises :class:`ChampionUnavailable` when its model cannot be downloaded or loaded."""
    import mlflow

    from tasks.modeling.domains import split_as_trained
    from tlcore import data, metrics

    try:
        model, meta = load_version(name, champ)
    except Exception as e:  # noqa: BLE001 - a download, checksum or load failure: the champion cannot be measured
        raise ChampionUnavailable(
            f"the champion, {name} version {champ.version}, cannot be loaded: {str(e).rstrip('.')}. The gate "
            f"re-measures the champion on this run's test images and cannot decide without it. Restore its model file "
            f"(model.pt under {champ.source}) in the artifact store, or make a loadable version the champion "
            f"(`tl promote {name} VERSION --why ...`, or `tl rollback {name} --why ...` to the one it replaced), "
            f"then rerun the register stage (`dvc repro register`)."
        ) from None
    classes = manifest["target"]["classes"]
    if list(meta["classes"]) != list(classes):
        return (
            f"it predicts classes {meta['classes'][:12]} but this target has {classes[:12]} "
            f"(another label set: its scores here would be meaningless)"
        )
    try:
        trained = Path(
            mlflow.artifacts.download_artifacts(
                run_id=champ.run_id, artifact_path=TRAIN_HASHES, tracking_uri=tracking_uri()
            )
        )
        overlap = test_hashes & set(trained.read_text().split())
    except Exception:  # noqa: BLE001 - registered before image hashes were recorded: overlap unknown
        overlap = set()
    if overlap:
        return (
            f"it was trained on {len(overlap)} of the {len(test_hashes)} images of this test split (the split "
            f"changed: another base.seed, or new target data), so its score here would be inflated"
        )
    try:
        # the same prepared images the new model was scored on (predictions.csv follows this split's order), fed
        # as the champion's checkpoint says: a model trained at 32 px is not scored at this run's 48
        test_ds = split_as_trained(params.path("data", "target", "test"), meta)
        loader = data.make_loader(test_ds, params.evaluate.batch_size, train=False)
        champ_correct = metrics.correct(model, loader, "cpu")
    except Exception as e:  # noqa: BLE001
        return f"it could not be evaluated on this test split ({e})"
    if len(champ_correct) != len(new_correct):
        raise StageError(
            f"{params.path('reports', 'predictions.csv')} has {len(new_correct)} rows but the test split "
            f"{params.path('data', 'target', 'test')} holds {len(champ_correct)} images: the evaluate stage's output "
            f"is from other data. Rerun the pipeline (`dvc repro`)."
        )
    return paired(new_correct, champ_correct.tolist())


def _find_version(c, name: str, key: str):
    found = c.search_model_versions(f"name = '{name}' and tags.registration_key = '{key}'")
    return min(found, key=lambda v: int(v.version)) if found else None


def _log_run(
    c, params: Params, exp_id: str, key: str, lineage: dict, metrics: dict, compress: dict, model: Path
) -> tuple[str, str]:
    """The MLflow run of this registration (a finished one with the same key is reused), with ``model`` (the
    candidate's file) as its model; ``(run_id, model uri)``."""
    import mlflow

    for r in c.search_runs([exp_id], f"tags.registration_key = '{key}'"):
        if r.info.status == "FINISHED":
            return r.info.run_id, f"{r.info.artifact_uri}/model"
        c.set_terminated(r.info.run_id, "FAILED")  # a run cut short by a crash: closed, not reused
    staged = Path(tempfile.mkdtemp(prefix="tl-model-"))
    try:
        shutil.copy2(model, staged / "model.pt")
        (staged / "params.yaml").write_text(yaml.safe_dump(params.model_dump(), sort_keys=False))
        hashes = Path(tempfile.mkdtemp(prefix="tl-lineage-", dir=staged.parent))
        (hashes / Path(TRAIN_HASHES).name).write_text("\n".join(image_hashes(params.path("data", "target", "train"))))
        if Path("dvc.lock").is_file():
            shutil.copy2("dvc.lock", hashes / Path(DVC_LOCK).name)
        with mlflow.start_run(experiment_id=exp_id) as run:
            mlflow.set_tags({**lineage, "registration_key": key})
            mlflow.log_params({k: str(v)[:500] for k, v in _flatten(params.model_dump()).items()})
            mlflow.log_metrics(
                {
                    k: float(v)
                    for k, v in {**metrics, **_flatten(compress)}.items()
                    if isinstance(v, (int, float)) and not isinstance(v, bool)
                }
            )
            mlflow.log_artifacts(str(staged), artifact_path="model")
            mlflow.log_artifacts(str(hashes), artifact_path=str(Path(TRAIN_HASHES).parent))
            if params.path("reports").is_dir():
                mlflow.log_artifacts(str(params.path("reports")), artifact_path="reports")
        shutil.rmtree(hashes, ignore_errors=True)
        return run.info.run_id, f"{run.info.artifact_uri}/model"
    finally:
        shutil.rmtree(staged, ignore_errors=True)


def _decide(
    c,
    name: str,
    champ,
    params: Params,
    cand: Candidate,
    metrics: dict,
    base: dict,
    manifest: dict,
    lineage: dict,
    check: dict | None,
) -> Decision:
    if champ is not None and champ.tags.get("model_sha256") == lineage["model_sha256"]:
        return Decision(False, [f"unchanged: the same model file as champion v{champ.version}; it stays champion"])
    accuracy, new_correct = candidate_results(params, cand, metrics, base)
    vs_champ = None
    if champ is not None:
        test_hashes = set(image_hashes(params.path("data", "target", "test")))
        vs_champ = compare_with_champion(c, name, champ, params, manifest, test_hashes, new_correct)
    over = metrics.get("gain_baseline")
    if cand.is_scratch_baseline:  # nothing was transferred: there is no negative transfer to guard against
        vs_base = f"the candidate is the {over} baseline itself, so there is no transfer to guard against"
    else:
        vs_base = paired(new_correct, base[f"{over}_correct"]) if over and base.get(f"{over}_correct") else None
    return decide(params.register, accuracy, vs_champ, champ.version if champ else None, vs_base, over, check)


def _adaptation(ft: dict, cand: Candidate) -> dict | None:
    """The 0-label adaptation check of a transfer model trained with no target labels (finetune.json's
    ``selection.check``, tasks/modeling/strategy_choice.py); None for scratch or a run that had none."""
    return None if cand.is_scratch_baseline else (ft.get("selection") or {}).get("check")


def _check_tag(check: dict | None) -> dict[str, str]:
    """``adaptation_check``: "failed (agreement 0.16)" / "passed (agreement 0.89)", when there was one."""
    if not check:
        return {}
    return {"adaptation_check": f"{'failed' if check['failed'] else 'passed'} (agreement {check['agreement']:.2f})"}


def _still_true(params: Params, key: str) -> dict | None:
    """The last ``registration.json``, if it still holds: the same registry, model, params and data, and a registry
    not written since this stage last read it (the listing cache of :mod:`tasks.services.registry`, sqlite only),
    which shows the version and the champion alias it says. Then a rerun needs no MLflow at all."""
    f = params.path("reports", "registration.json")
    last = read_json(f) if f.is_file() else {}
    if not last or last.get("tracking_uri") != tracking_uri() or last.get("registration_key") != key:
        return None
    snap = cached(params.register.model_name)
    version = str(last.get("version"))
    if snap is None or version not in snap["versions"]:
        return None
    champion = (snap["aliases"].get("champion") or {}).get("version")
    return {**last, "new_version": False} if (champion == version) == last.get("promoted") else None


def register(params: Params) -> dict:
    name = params.register.model_name
    metrics = read_json(params.path("reports", "metrics.json"))
    compress = (
        read_json(params.path("reports", "compress.json")) if params.path("reports", "compress.json").is_file() else {}
    )
    manifest = read_json(params.path("data", "manifest.json"))
    base = read_json(params.path("reports", "baselines.json"))
    ft = read_json(params.path("reports", "finetune.json"))
    cand = choose(ft, base)  # the transfer model, or scratch
    check = _adaptation(ft, cand)  # a transfer model chosen with no target labels: did the adaptation work?
    model = model_path(params, cand)
    accuracy = candidate_results(params, cand, metrics, base)[0]
    ident = {
        **dvc_lineage("dvc.lock", manifest),
        "params_hash": params_hash(params),
        "model_sha256": file_sha256(model),
    }
    key = registration_key(ident)
    if (same := _still_true(params, key)) is not None:
        say(
            f"register: {name} version {same['version']} -> "
            f"{'champion' if same['promoted'] else 'challenger only (not promoted)'}, as registered (this model, "
            f"params and data; {same['tracking_uri']} unchanged since)"
        )
        write_json(params.path("reports", "registration.json"), same)
        return same
    lineage = {**git_info(), **ident, **environment(params)}
    import mlflow

    c = client()
    mlflow.set_tracking_uri(tracking_uri())  # the fluent run API below; this stage is its own process
    # the project lock keeps one checkout's runs apart; the registry lock, held in the shared registry, keeps
    # registrations from other checkouts and machines (concurrent `tl submit` jobs) out of the gate's window
    with project_lock(project_root(), "register stage"), registry_lock(c, name, f"register stage in {project_root()}"):
        mv = _find_version(c, name, key)
        new_version = mv is None
        if mv is None:
            run_id, source_uri = _log_run(
                c, params, experiment_id(c, params.register.experiment), key, lineage, metrics, compress, model
            )
            if not c.search_registered_models(filter_string=f"name = '{name}'"):
                c.create_registered_model(
                    name, description="Transferred classifier registered by the transfer pipeline."
                )
            mv = c.create_model_version(
                name,
                source=source_uri,
                run_id=run_id,
                tags={
                    **lineage,
                    "registration_key": key,
                    "gate_decision": "pending",
                    "accuracy": str(accuracy),  # the registered model's, on the test split
                    "transfer_gain": str(metrics["transfer_gain"]),  # the transfer model's (it may not be the one)
                    "gain_baseline": str(metrics.get("gain_baseline")),
                    "strategy": cand.strategy,  # what trained the registered model
                    "candidate": cand.strategy,
                    "candidate_why": cand.why,
                    "model_file": model.as_posix(),  # the pipeline output registered (what a replay compares)
                    "transfer_strategy": metrics["strategy"],
                    "transfer_accuracy": str(metrics["accuracy"]),
                    "backbone": params.pretrain.backbone,
                    **_check_tag(check),
                },
            )
        else:
            say(f"register: this model, params and data are already {name} version {mv.version} (reused)")
        champ = version_by_alias(c, name, "champion")
        if mv.tags.get("registration") == "complete" or (champ is not None and champ.version == mv.version):
            # done before: report what holds now (a later promotion may have replaced it), change nothing
            decision = Decision(
                champ is not None and champ.version == mv.version,
                [x for x in mv.tags.get("gate_reasons", "").splitlines() if x],
            )
            previous = mv.tags.get("previous_champion") or None
        else:
            try:
                decision = _decide(c, name, champ, params, cand, metrics, base, manifest, lineage, check)
            except ChampionUnavailable as e:  # never "not comparable, keep it" in silence: a champion nobody can load
                c.set_model_version_tag(name, mv.version, "gate_reasons", f"ERROR: {e}")
                raise ChampionUnavailable(
                    f"{e} Nothing was promoted: version {mv.version} is registered without an alias "
                    f"(gate_decision pending)."
                ) from None
            previous = champ.version if decision.promoted and champ is not None else None
            for k, v in {
                "gate_decision": "promoted" if decision.promoted else "rejected",
                "gate_reasons": "\n".join(decision.reasons),
                "gate_p_champion": "" if decision.p_champion is None else f"{decision.p_champion:.4g}",
                "gate_p_baseline": "" if decision.p_baseline is None else f"{decision.p_baseline:.4g}",
                "gate_compared_with": champ.version if champ is not None else "",
                "gate_delta_champion": "" if decision.delta_champion is None else f"{decision.delta_champion:+.4f}",
                "gate_delta_baseline": "" if decision.delta_baseline is None else f"{decision.delta_baseline:+.4f}",
                **({"previous_champion": previous} if previous else {}),
            }.items():
                c.set_model_version_tag(name, mv.version, k, str(v))
            now = version_by_alias(c, name, "champion")
            if (now.version if now else None) != (champ.version if champ else None):
                c.set_model_version_tag(name, mv.version, "gate_decision", "pending")  # never "promoted" off-champion
                raise RegistrationRaced(
                    f"champion changed during registration: the gate compared version {mv.version} with champion "
                    f"{'v' + str(champ.version) if champ else '(none)'}, but it is now "
                    f"{'v' + str(now.version) if now else '(none)'}. Aliases were left as they are; rerun the stage "
                    f"(`dvc repro register`) to gate against the new champion."
                )
            c.set_registered_model_alias(name, "challenger", mv.version)
            if decision.promoted:
                c.set_registered_model_alias(name, "champion", mv.version)
            c.set_model_version_tag(name, mv.version, "registration", "complete")
    promoted = decision.promoted
    say(f"register: candidate {cand.why}")
    say(f"register: {name} version {mv.version} -> {'champion' if promoted else 'challenger only (not promoted)'}")
    for r in decision.reasons:
        say(f"register:   {r}")
    out = {
        "model_name": name,
        "version": int(mv.version),
        "promoted": promoted,
        "candidate": cand.strategy,
        "candidate_why": cand.why,
        "model_file": model.as_posix(),
        "accuracy": accuracy,
        "reasons": decision.reasons,
        "p_champion": decision.p_champion,
        "p_baseline": decision.p_baseline,
        "run_id": mv.run_id,
        "model_uri": f"models:/{name}/{mv.version}",
        "previous_champion": int(previous) if previous else None,
        "tracking_uri": public_uri(tracking_uri()),  # never a password or token in a record
        "registration_key": key,
        "new_version": new_version,  # False: this model, params and data were registered before (reused)
        **lineage,
    }
    write_json(params.path("reports", "registration.json"), out)
    refresh(name, c)  # `tl models` right after a run reads the cache instead of starting MLflow
    return out


if __name__ == "__main__":
    stage_main(register)
