"""``transfer_pipeline``: the DVC stages as Prefect tasks, with retries on I/O and report artifacts.

Each Prefect task runs one stage through ``dvc repro --single-item <stage>``: the same
``python -m tasks.stages.<stage>`` that ``dvc.yaml`` declares, with DVC's lock and cache deciding
whether it runs or is skipped, so the flow and ``dvc repro`` always agree and ``dvc status`` is
clean afterwards (but for the two stages DVC runs every time: the ``inputs`` fingerprints and ``register``,
which reports on the registry the run points at). Runs on Prefect's ephemeral local API unless
``PREFECT_API_URL`` is set.

Importing this module writes no environment variable. The entry points set the process environment before
Prefect is imported (:func:`tasks.project.env.configure_environment`: telemetry off, a start-up timeout for a
slow machine): ``tl``, the team stack's worker, the tests' ``conftest.py``.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger, task

from tasks.project.env import always_changed_stages, dvc, stage_names
from tasks.project.settings import settings


class ProjectRefused(ValueError):
    """A flow run asked for a project other than the one its worker was deployed for."""


def project_repo(repo: str) -> str:
    """``repo`` as an absolute path; where a worker was deployed for one project (``TL_PROJECT_DIR``, set by the
    team stack and compose), only that one: anyone who may create a flow run must not pick which directory's
    ``dvc.yaml`` the worker runs, with its credentials."""
    path, allowed = Path(repo).resolve(), settings().project_dir
    if allowed is not None and path != allowed.resolve():
        raise ProjectRefused(
            f"this worker runs only the project {allowed.resolve()} (TL_PROJECT_DIR), not {path}: nothing was run. "
            f"Leave the flow's `repo` parameter at its default, or deploy a worker for that project."
        )
    return str(path)


@task(name="stage", task_run_name="{stage}")
def run_stage(stage: str, repo: str, force: bool = False) -> dict:
    """Reproduce one stage with DVC; returns whether it ran or was up to date."""
    log = get_run_logger()
    r = dvc(["repro", "--single-item", stage, *(["--force"] if force else [])], repo, capture=True)
    for line in (r.stdout + r.stderr).splitlines():
        if line.strip():
            log.info(line)
    if r.returncode != 0:
        raise RuntimeError(f"stage {stage!r} failed (dvc exit {r.returncode}):\n{r.stderr[-2000:] or r.stdout[-2000:]}")
    ran = f"Running stage '{stage}'" in r.stdout
    return {"stage": stage, "ran": ran}


@task(name="register", retries=2, retry_delay_seconds=[2, 10])
def register_stage(repo: str) -> dict:
    """The registration stage talks to the MLflow tracking server: retried on failure."""
    return run_stage.fn("register", repo)


@task(name="dvc-push", retries=3, retry_delay_seconds=[2, 5, 15])
def dvc_push(repo: str) -> str:
    """Push data and models to the DVC remote (network I/O: retried)."""
    r = dvc(["push", "--quiet"], repo, capture=True)
    if r.returncode != 0:
        raise ConnectionError(f"dvc push failed: {r.stderr[-1000:]}")
    return "pushed"


@task(name="apply-params")
def apply_params(repo: str, overrides: list[str]) -> list[str]:
    """Validate the overrides and that the strategy suits the data (fail before any work), then write them
    into params.yaml."""
    from tasks.modeling.plan import plan
    from tasks.project.config import load_params
    from tasks.project.env import write_overrides

    params_file = Path(repo) / "params.yaml"
    choice, _ = plan(load_params(params_file, overrides), root=Path(repo))
    print(f"strategy: {choice.describe()}")
    if overrides:
        write_overrides(params_file, overrides)
    return overrides


@task(name="publish-artifacts")
def publish(repo: str) -> dict:
    """Markdown report and per-class table as Prefect artifacts."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    from tasks.project.config import load_params
    from tasks.project.files import read_json
    from tasks.project.report import table

    params = load_params(Path(repo) / "params.yaml")
    rep = Path(repo) / params.base.reports_dir
    m, reg = read_json(rep / "metrics.json"), read_json(rep / "registration.json")
    comp = read_json(rep / "compress.json") if (rep / "compress.json").exists() else {}
    so = m["source_only_accuracy"]
    md = [
        f"# Transfer pipeline: `{m['strategy']}` ({params.data.source} -> {params.data.target})",
        "",
        table([{"metric": k, "value": v} for k, v in m.items()], ["metric", "value"]),
        "",
        (
            f"**Transfer gain over {m['gain_baseline']}:** {m['transfer_gain'] * 100:+.2f} points; over source-only: "
            + (f"{(m['accuracy'] - so) * 100:+.2f} points." if so is not None else "n/a.")
        )
        if m.get("gain_baseline")
        else "**Transfer gain:** n/a (no baseline applies).",
        "",
        f"**Gate:** {'promoted to champion' if reg['promoted'] else 'not promoted (challenger only)'}",
        "",
        *(f"- {r}" for r in reg["reasons"]),
        "",
        f"**Model:** `{reg['model_uri']}` in `{reg['tracking_uri']}` (run `{reg['run_id']}`)",
        "",
    ]
    if comp:
        md += [
            "## Compression",
            "",
            table([{"variant": k, **v} for k, v in comp.items()], ["variant", "accuracy", "size_mb", "latency_ms_p50"]),
        ]
    create_markdown_artifact(markdown="\n".join(md), key="transfer-report", description="Transfer pipeline report")
    per_class = read_json(rep / "evaluation.json")["per_class"]
    create_table_artifact(table=per_class, key="per-class-metrics", description="Per-class precision/recall/F1")
    return {"metrics": m, "registration": reg}


@flow(name="transfer-pipeline", log_prints=True)
def transfer_pipeline(
    repo: str = ".",
    strategy: str | None = None,
    labels_per_class: int | None = None,
    backbone: str | None = None,
    finetune_epochs: int | None = None,
    num_workers: int | None = None,
    overrides: list[str] | None = None,
    force: bool = False,
    push: bool = True,
) -> dict:
    """Run data -> pretrain -> finetune -> baselines -> evaluate -> compress -> register.

    Typed parameters are shortcuts for ``-S`` overrides (``strategy`` is ``finetune.strategy``,
    ``labels_per_class`` is ``data.labels_per_class`` ...); ``overrides`` takes any others.
    """
    from tasks.services.lock import project_lock

    repo = project_repo(repo)
    with project_lock(repo, "transfer-pipeline flow"):  # re-entrant under `tl run --prefect` and `retrain`
        return _pipeline(
            repo, strategy, labels_per_class, backbone, finetune_epochs, num_workers, overrides, force, push
        )


def _pipeline(repo, strategy, labels_per_class, backbone, finetune_epochs, num_workers, overrides, force, push) -> dict:
    sets = list(overrides or [])
    for key, val in (
        ("finetune.strategy", strategy),
        ("data.labels_per_class", labels_per_class),
        ("pretrain.backbone", backbone),
        ("finetune.epochs", finetune_epochs),
        ("ray.num_workers", num_workers),
    ):
        if val is not None:
            sets.append(f"{key}={val}")
    apply_params(repo, sets)
    stages = stage_names(repo)
    results = [run_stage(s, repo, force) for s in stages if s != "register"]
    results.append(register_stage(repo))
    if push:
        dvc_push(repo)
    out = publish(repo)
    always = always_changed_stages(repo)  # read dvc.yaml once, not once per stage
    # a stage DVC runs every time is news only when it made something new: `register` a new version
    new = {"register": bool(out["registration"].get("new_version"))}
    ran = [r["stage"] for r in results if r["ran"] and (r["stage"] not in always or new.get(r["stage"]))]
    print(f"stages run: {', '.join(ran) or 'none (everything up to date)'}")
    return {**out, "stages_run": ran}


if __name__ == "__main__":
    transfer_pipeline()
