"""``tl tune``: search strategy x learning rate x strategy params with Ray Tune and ASHA early stopping.

The space is the ``tune:`` section of ``params.yaml``, a grid (every strategy with every learning rate and
every combination of its ``tune.strategy_params``). Each trial is the finetune stage's training job
(:func:`tasks.modeling.train.target_job`, the same data split, source model and engine) with the trial's strategy,
learning rate and params, for ``tune.epochs`` epochs, run inside the Tune trial's process; every epoch it
reports the objective and a checkpoint, and ASHA stops the trials that trail.

Objective: ``val_accuracy`` on the held-out labeled validation images when ``data.val_per_class`` (``auto``
resolved: :func:`tasks.modeling.plan.val_per_class`) holds some out; with
none, the label-free validator ``tune.validator`` (:mod:`tlcore.validators`; ``auto``: the one the selection
benchmark found best, :data:`tasks.project.measured.AUTO_VALIDATOR`) on the target training split
with its labels unused (the pool ``evaluate`` scores as ``val_free_*``). The target test split is never read.

Resuming: the experiment lives in ``<ray.storage_path>/tune/<name>``, the name a hash of the params, the
data and the code. Starting ``tl tune`` again after a crash restores it (``Tuner.restore``): finished trials
are kept, unfinished ones resume from their last epoch's checkpoint. ``--fresh`` starts over.

Result, as ``dvc exp`` users expect: nothing in the workspace changes by default; the best configuration is
written to ``<reports_dir>/tune.json`` with the ``tl run -S ...`` command that trains it, and ``--apply``
writes it into params.yaml (as ``dvc exp apply`` does). Every trial is an MLflow child run (params, the
objective per epoch) of one parent run per experiment in ``register.experiment``.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
from pathlib import Path

from tasks.modeling.domains import VALIDATOR_IMAGES
from tasks.modeling.strategy_choice import pool_dataset
from tasks.project.config import Params, ParamsError
from tasks.project.files import read_json, write_json
from tasks.project.measured import resolve_validator
from tasks.project.stage import StageError, say


def space(params: Params) -> list[dict]:
    """The grid: ``[{"strategy", "lr", "strategy_params"}, ...]`` in ``params.tune`` order."""
    t = params.tune
    trials = []
    for strategy in t.strategies:
        grid = t.strategy_params.get(strategy, {})
        for combo in itertools.product(*grid.values()):
            for lr in t.lr:
                trials.append({"strategy": strategy, "lr": lr, "strategy_params": dict(zip(grid, combo))})
    return trials


def objective(params: Params, manifest: dict | None = None) -> tuple[str, str]:
    """``(metric, mode)`` the search maximises or minimises (``manifest``: the data stage's, for the target's class
    counts that ``data.val_per_class: auto`` may need)."""
    from tasks.modeling.plan import train_counts, val_per_class
    from tlcore.validators import HIGHER_IS_BETTER

    if val_per_class(params, train_counts(manifest) if manifest else None) > 0:
        return "val_accuracy", "max"
    v = resolve_validator(params.tune.validator)
    return f"val_free_{v}", "max" if HIGHER_IS_BETTER[v] else "min"


def overrides(best: dict) -> list[str]:
    """The ``-S`` overrides that make the finetune stage train ``best``."""
    sp = json.dumps(best["strategy_params"], sort_keys=True) if best["strategy_params"] else "{}"
    return [f"finetune.strategy={best['strategy']}", f"finetune.lr={best['lr']!r}", f"finetune.strategy_params={sp}"]


def _check_space(params: Params, manifest: dict) -> None:
    """Every strategy of the space must suit the data and the label budget (as ``tl check`` rules)."""
    from tasks.modeling.plan import plan

    for s in params.tune.strategies:
        p = params.model_copy(update={"finetune": params.finetune.model_copy(update={"strategy": s})})
        try:
            plan(p, manifest)
        except ParamsError as e:
            raise ParamsError(f"tune.strategies lists {s!r}, which cannot run here: {e}") from None


class TuneReport:
    """Engine callback: each epoch, the objective (a label-free validator when there is no validation set) and
    a checkpoint go to Ray Tune, which decides through ASHA whether the trial goes on."""

    def __init__(self, metric: str, pool_loader, device):
        self.metric, self.pool_loader, self.device = metric, pool_loader, device

    def on_epoch_end(self, metrics: dict, state) -> None:
        import tempfile

        import torch
        from ray import tune

        from tlcore import validators

        if self.metric.startswith("val_free_"):
            _, logits, _ = validators.features_and_logits(
                state.net.model, self.pool_loader, self.device, limit=VALIDATOR_IMAGES
            )
            metrics[self.metric] = validators.scores(logits)[self.metric.removeprefix("val_free_")]
        with tempfile.TemporaryDirectory() as d:
            torch.save(state.state_dict(), Path(d) / "state.pt")
            tune.report(
                {k: v for k, v in metrics.items() if isinstance(v, (int, float))},
                checkpoint=tune.Checkpoint.from_directory(d),
            )


def trial_key(trial: dict) -> str:
    """Which of the driver's jobs a trial trains: its strategy and strategy params (the learning rate varies)."""
    return json.dumps([trial["strategy"], trial["strategy_params"]], sort_keys=True)


def trial(
    config: dict,
    params: Params,
    jobs: dict,
    pool,
    metric: str,
    threads: int,
    staged: dict,
    storage: str,
    cpus: float = 1,
) -> None:
    """One Tune trial: the finetune job with this trial's strategy, learning rate and params. The job and the
    validator's pool come from the driver (its data streamed where they lie, or staged for this node when it
    does not see them: :mod:`tasks.modeling.shard_staging`), so a trial needs no copy of the project."""
    import copy

    import torch
    from ray import tune

    from tasks.modeling import shard_staging
    from tasks.modeling.hardware import loader_workers, resolve_precision
    from tasks.modeling.train import build_trainer
    from tasks.services.ray_checkpoints import load_state
    from tlcore import data

    torch.set_num_threads(threads)
    c = config["trial"]
    job = copy.copy(jobs[trial_key(c)])  # an actor reused for the next trial starts from the driver's job again
    if staged:
        shard_staging.localize([*shard_staging.job_datasets(job), pool], staged, storage)
    device = torch.device("cuda" if params.ray.use_gpu else "cpu")
    precision, _ = resolve_precision(
        job.optim.precision, job.arch, job.num_classes, job.optim.batch_size, device, image_shape=job.image_shape()
    )
    job.optim = job.optim.model_copy(update={"lr": c["lr"], "epochs": params.tune.epochs, "precision": precision})
    job.loader_workers = loader_workers(params.data.loader_workers, device.type, cpus, job.streams_a_split())
    loader = data.make_loader(pool, params.evaluate.batch_size, train=False) if pool is not None else None
    trainer = build_trainer(job, device, callbacks=[TuneReport(metric, loader, device)], log=None)
    ckpt = tune.get_checkpoint()
    if ckpt is not None:  # a restored experiment: go on from the trial's last epoch
        with ckpt.as_directory() as d:
            trainer.load_state_dict(load_state(d))
    trainer.fit()


def experiment_name(params: Params, manifest: dict) -> str:
    """``tune-<hash>`` of the params a trial reads, the data and the code: a changed space starts a new one. The
    finetune values a trial replaces (strategy, lr, strategy_params) are left out, so ``--apply`` writing the
    best into params.yaml does not turn the finished search into a new one."""
    from tasks.services.ray_runs import code_hash

    exclude = {
        "register": True,
        "evaluate": True,
        "compress": True,
        "finetune": {"strategy", "lr", "strategy_params", "epochs"},
    }
    blob = json.dumps(
        {
            "params": params.model_dump(exclude=exclude),
            "data": {r: manifest[r]["splits"] for r in ("source", "target")},
            "code": code_hash("tune"),
        },
        sort_keys=True,
        default=str,
    )
    return f"tune-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"


def tune(params: Params, fresh: bool = False, apply_to: Path | None = None, verbose: int = 1) -> dict:
    """Run (or resume) the search; returns and writes ``<reports_dir>/tune.json``.

    ``apply_to``: a params.yaml to write the best configuration into (``tl tune --apply``); ``verbose``: Tune's
    progress table on stdout (1) or not (0)."""
    for need in (params.path("data", "manifest.json"), params.path("models", "source.pt")):
        if not need.is_file():
            raise StageError(
                f"tl tune needs {need}, which does not exist: run the data and pretrain stages first "
                f"(`dvc repro pretrain`, or `tl run`)"
            )
    manifest = read_json(params.path("data", "manifest.json"))
    _check_space(params, manifest)

    import ray
    from ray import tune as rt
    from ray.tune.schedulers import ASHAScheduler

    from tasks.modeling import shard_staging
    from tasks.modeling.hardware import trial_resources
    from tasks.modeling.train import target_jobs
    from tasks.services.ray_cluster import cluster_cpus, init_ray
    from tasks.services.ray_runs import live_nodes, prove_shared_storage, storage_filesystem, storage_path, worker_nodes

    metric, mode = objective(params, manifest)
    name = experiment_name(params, manifest)
    storage = storage_path(params).rstrip("/") + "/tune"  # a local folder or a URI (s3://...)
    path = f"{storage}/{name}"
    grid = space(params)
    say(
        f"tune: {len(grid)} trial(s) of up to {params.tune.epochs} epoch(s), objective {metric} ({mode}), "
        f"experiment {path}"
    )
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")  # one checkpoint an epoch
    init_ray(params)
    prove_shared_storage(storage)  # trials resume from checkpoints, maybe on another node
    per_trial = trial_resources(cluster_cpus(), params.tune.concurrent_trials, params.ray.use_gpu)
    say(f"tune: each trial gets {per_trial} (on one node)")
    threads = params.base.num_threads or int(per_trial["CPU"])
    # every trial's job and the validator's pool, built here once: the trials read the data from the shards (index
    # only in the object store), staged to the storage for nodes that do not see this one's data/
    distinct = {trial_key(t): (t["strategy"], t["strategy_params"]) for t in grid}  # the learning rates share one
    jobs = dict(zip(distinct, target_jobs(params, list(distinct.values()))[0]))  # the data and weights shared
    arch = next(iter(jobs.values())).arch
    pool = pool_dataset(params, arch) if metric.startswith("val_free_") else None
    staged = {}
    if len(nodes := live_nodes()) > 1:
        datasets = [d for j in jobs.values() for d in shard_staging.job_datasets(j)] + [pool]
        staged = shard_staging.stage(datasets, storage, nodes=nodes, log=say)
        shard_staging.prefetch(staged, storage, worker_nodes(per_trial), log=say)
    fn = rt.with_resources(
        rt.with_parameters(
            trial,
            params=params,
            jobs=jobs,
            pool=pool,
            metric=metric,
            threads=threads,
            staged=staged,
            storage=storage,
            cpus=per_trial["CPU"],
        ),
        per_trial,
    )
    import pyarrow.fs as pafs

    fs, fs_storage = storage_filesystem(storage)  # s3:// through s3fs, as Ray Train's runs
    experiment = f"{fs_storage}/{name}"
    if fresh and fs.get_file_info(experiment).type != pafs.FileType.NotFound:
        fs.delete_dir(experiment)
    restored = rt.Tuner.can_restore(experiment, storage_filesystem=fs)
    if restored:
        say(f"tune: resuming {name}: finished trials are kept, unfinished ones go on from their last checkpoint")
        tuner = rt.Tuner.restore(experiment, trainable=fn, resume_errored=True, storage_filesystem=fs)
    else:
        asha = ASHAScheduler(
            time_attr="training_iteration",
            max_t=params.tune.epochs,
            grace_period=min(params.tune.grace_period, params.tune.epochs),
            reduction_factor=params.tune.reduction_factor,
        )
        tuner = rt.Tuner(
            fn,
            param_space={"trial": rt.grid_search(grid)},
            tune_config=rt.TuneConfig(
                metric=metric,
                mode=mode,
                scheduler=asha,
                max_concurrent_trials=params.tune.concurrent_trials,
                reuse_actors=True,
            ),
            run_config=rt.RunConfig(
                name=name,
                storage_path=fs_storage,
                storage_filesystem=fs,
                verbose=verbose,
                checkpoint_config=rt.CheckpointConfig(num_to_keep=1),
                failure_config=rt.FailureConfig(max_failures=params.ray.max_failures),
            ),
        )
    try:
        grid_result = tuner.fit()
    finally:
        ray.shutdown()
    trials = [_trial_row(r, metric) for r in grid_result]
    errors = [t for t in trials if t["error"]]
    done = [t for t in trials if t["objective"] is not None]
    if not done:
        raise StageError(f"tl tune: no trial reported {metric}; first error: {errors[0]['error'] if errors else '?'}")
    best = (max if mode == "max" else min)(done, key=lambda t: t["objective"])
    out = {
        "experiment": name,
        "path": path,
        "objective": metric,
        "mode": mode,
        "restored": restored,
        "best": best["config"],
        "best_objective": best["objective"],
        "overrides": overrides(best["config"]),
        "trials": trials,
        "report": str(params.path("reports", "tune.json")),
    }
    out["mlflow_run_id"] = log_to_mlflow(params, out)
    write_json(params.path("reports", "tune.json"), out)
    if apply_to is not None:
        from tasks.project.env import write_overrides

        write_overrides(apply_to, out["overrides"])
    return out


def _trial_row(result, metric: str) -> dict:
    df = result.metrics_dataframe
    history = (
        []
        if df is None or metric not in df
        else [
            {
                "epoch": int(r["training_iteration"]),
                metric: float(r[metric]),
                **(
                    {"val_accuracy": float(r["val_accuracy"])}
                    if "val_accuracy" in r and r["val_accuracy"] == r["val_accuracy"]
                    else {}
                ),
            }
            for _, r in df.iterrows()
        ]
    )
    return {
        "trial_id": (result.metrics or {}).get("trial_id") or Path(result.path).name,
        "config": result.config["trial"],
        "epochs": len(history),
        "objective": history[-1][metric] if history else None,
        "history": history,
        "error": str(result.error).splitlines()[0][:300] if result.error else None,
    }


def log_to_mlflow(params: Params, out: dict) -> str:
    """One parent run for the experiment, one child run per trial not logged before (a resumed experiment logs
    only its new trials); returns the parent's run id."""
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

    from tasks.services.tracking import client, experiment_id

    c = client()
    exp = experiment_id(c, params.register.experiment)
    tag = f"tags.tl_tune = '{out['experiment']}'"
    parents = c.search_runs([exp], f"{tag} and tags.tl_tune_role = 'parent'")
    parent = (
        parents[0]
        if parents
        else c.create_run(
            exp, run_name=out["experiment"], tags={"tl_tune": out["experiment"], "tl_tune_role": "parent"}
        )
    )
    pid = parent.info.run_id
    logged = {r.data.tags.get("tl_tune_trial") for r in c.search_runs([exp], f"{tag} and tags.tl_tune_role = 'trial'")}
    for t in out["trials"]:
        if t["trial_id"] in logged:
            continue
        cfg = t["config"]
        run = c.create_run(
            exp,
            tags={
                MLFLOW_PARENT_RUN_ID: pid,
                "tl_tune": out["experiment"],
                "tl_tune_role": "trial",
                "tl_tune_trial": t["trial_id"],
                MLFLOW_RUN_NAME: f"{cfg['strategy']}-lr{cfg['lr']}",
            },
        )
        ps = [Param("strategy", cfg["strategy"]), Param("lr", str(cfg["lr"])), Param("epochs_run", str(t["epochs"]))]
        ps += [Param(f"strategy_params.{k}", str(v)) for k, v in cfg["strategy_params"].items()]
        ms = [Metric(k, v, 0, h["epoch"]) for h in t["history"] for k, v in h.items() if k != "epoch"]
        c.log_batch(run.info.run_id, metrics=ms, params=ps, tags=[RunTag("error", t["error"])] if t["error"] else [])
        c.set_terminated(run.info.run_id, "FAILED" if t["error"] else "FINISHED")
    c.log_batch(
        pid,
        params=[] if parents else [Param("objective", out["objective"]), Param("trials", str(len(out["trials"])))],
        tags=[RunTag("best", json.dumps(out["best"], sort_keys=True))],
        metrics=[Metric(f"best_{out['objective']}", out["best_objective"], 0, 0)],
    )
    c.set_terminated(pid, "FINISHED")
    return pid


def table(out: dict) -> str:
    """The trials, best first, and the command that trains the best."""
    rows = sorted(
        out["trials"],
        key=lambda t: (
            t["objective"] is None,
            -(t["objective"] or 0) if out["mode"] == "max" else (t["objective"] or 0),
        ),
    )
    lines = [f"{'strategy':<18}{'lr':<10}{'params':<28}{'epochs':<8}{out['objective']}"]
    for t in rows:
        c = t["config"]
        val = "error: " + t["error"] if t["error"] else "-" if t["objective"] is None else f"{t['objective']:.4f}"
        lines.append(f"{c['strategy']:<18}{c['lr']:<10g}{json.dumps(c['strategy_params']):<28}{t['epochs']:<8}{val}")
    how = (
        "accuracy on the held-out labeled validation images"
        if out["objective"] == "val_accuracy"
        else f"label-free validator {out['objective'].removeprefix('val_free_')} on the unlabeled target pool "
        f"({out['mode']}imise; no target labels used)"
    )
    lines += [
        "",
        f"objective: {how}; trials ASHA stopped early show fewer epochs.",
        f"best: {json.dumps(out['best'], sort_keys=True)} ({out['objective']} {out['best_objective']:.4f})",
        "train it:  tl run " + " ".join(f"-S '{o}'" for o in out["overrides"]),
        f"(also in {out['report']}; `tl tune --apply` writes it into params.yaml, as `dvc exp apply` does)",
    ]
    return "\n".join(lines)
