"""The ``tl`` command. Heavy imports (torch, dvc, mlflow, prefect, ray) happen inside commands."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Transfer-learning pipeline: DVC-versioned data, source pretraining, transfer, evaluation, "
    "compression and gated MLflow registration.",
)
STATE = {"debug": False}


@app.callback()
def _main(debug: bool = typer.Option(False, "--debug", help="show full tracebacks on errors")):
    STATE["debug"] = debug


def _fail(err: Exception) -> None:
    if STATE["debug"]:
        raise err
    typer.secho(f"error: {err}", fg="red", err=True)
    raise typer.Exit(2)


def _dvc(*args: str, check: bool = True) -> int:
    from tasks.project.env import dvc

    r = dvc(list(args))
    if check and r.returncode != 0:
        _fail(RuntimeError(f"`dvc {' '.join(args)}` failed (exit {r.returncode}); see the output above."))
    return r.returncode


@app.command()
def run(
    set_: list[str] = typer.Option([], "-S", "--set", help="override a param, DVC syntax: -S finetune.strategy=dann"),
    params: Path = typer.Option(Path("params.yaml"), help="params file"),
    force: bool = typer.Option(False, help="rerun every stage even if nothing changed"),
    push: bool = typer.Option(True, help="push data and models to the DVC remote afterwards"),
    prefect: bool = typer.Option(False, "--prefect", help="run as the Prefect flow (retries, artifacts, UI)"),
    verbose: bool = typer.Option(
        False,
        "--verbose",
        help="show everything Ray prints (also: TL_VERBOSE=1); by default one line per epoch and one per stage",
    ),
):
    """Run the whole pipeline with `dvc repro` (only stages whose inputs changed run)."""
    from tasks.project.console import set_verbose

    set_verbose(verbose)  # the stages DVC or Prefect start read it from the environment
    p = _checked(params, set_)
    from tasks.services.lock import ProjectLocked, project_lock
    from tasks.services.tracking import project_root

    try:
        with project_lock(project_root(params.resolve().parent), "tl run " + " ".join(f"-S {s}" for s in set_)):
            _run_locked(p, params, set_, force, push, prefect)
    except ProjectLocked as e:
        _fail(e)


def _run_locked(p, params: Path, set_: list[str], force: bool, push: bool, prefect: bool) -> None:
    if prefect:
        from flows.pipeline import transfer_pipeline

        transfer_pipeline(repo=str(params.resolve().parent), overrides=set_, force=force, push=push)
        return _summary(p)
    if set_:
        from tasks.project.env import write_overrides

        write_overrides(params, set_)
        typer.echo(f"params: applied {' '.join(set_)} to {params}")
    _dvc("repro", *(["--force"] if force else []))
    if push and _dvc("push", "--quiet", check=False) != 0:
        _summary(p)
        _fail(
            RuntimeError(
                "`dvc push` failed (see above): this run's data and models are NOT in the DVC remote, so "
                "its registered lineage cannot be restored elsewhere. Fix the remote (`dvc remote list`) "
                "and run `dvc push`, or pass --no-push to keep a run local on purpose."
            )
        )
    _summary(p)


def _summary(p) -> None:
    reports = p.path("reports")
    typer.echo("\nDone.")
    typer.echo(f"  report:  {reports / 'report.md'}  (figures in {reports / 'figures'})")
    typer.echo(f"  metrics: {reports / 'metrics.json'}, {reports / 'compress.json'}  (dvc metrics show)")
    reg = reports / "registration.json"
    if reg.is_file():
        import json

        r = json.loads(reg.read_text())
        typer.echo(
            f"  model:   {r['model_uri']} ({'champion' if r['promoted'] else 'challenger, not promoted'}) "
            f"in {r['tracking_uri']}"
        )
        if r.get("candidate_why"):
            typer.echo(f"  chosen:  {r['candidate_why']}")


def _checked(params: Path, set_: list[str]):
    """Validated params, after checking that the strategy and the label budget suit the data (tasks/modeling/plan.py):
    a strategy that cannot work stops here, before any stage runs. Prints what the run will use."""
    from tasks.modeling.plan import budget_text, labels_per_class, plan
    from tasks.project.config import ParamsError, load_params

    try:
        p = load_params(params, set_)
        choice, sets = plan(p, root=params.resolve().parent)
    except ParamsError as e:
        _fail(e)
    same = "the same" if sets.same else "different"
    typer.echo(
        f"plan: strategy {choice.describe()}; target labels: {budget_text(labels_per_class(p))}; classes: "
        f"{len(sets.source)} in source, {len(sets.target)} in target ({same})"
    )
    return p


@app.command()
def check(params: Path = typer.Option(Path("params.yaml")), set_: list[str] = typer.Option([], "-S", "--set")):
    """Validate params.yaml (and overrides), and that the strategy suits the data, without running anything."""
    _checked(params, set_)
    typer.echo(f"{params}: ok")


@app.command("list")
def list_(what: str = typer.Argument("all", help="models | strategies | all")):
    """List registered backbones and transfer strategies."""
    from tlcore.models import list_models
    from tlcore.strategies import list_strategies

    if what in ("models", "all"):
        typer.echo("backbones:  " + ", ".join(list_models()))
    if what in ("strategies", "all"):
        typer.echo("strategies: " + ", ".join(list_strategies()))


def _model_name(name: str | None) -> str:
    """``--name`` or ``register.model_name`` from the project's params.yaml (read without validating it:
    validation imports torch, which a registry listing does not need)."""
    if name:
        return name
    from tasks.project.config import Register, load_raw
    from tasks.services.tracking import project_root

    raw = load_raw(project_root() / "params.yaml")
    return (raw.get("register") or {}).get("model_name") or Register().model_name


@app.command()
def models(name: str | None = typer.Option(None, help="registered model name (default: register.model_name)")):
    """Registered versions with aliases, key metrics, strategy, why that model was the run's candidate (the transfer
    model or scratch, by validation accuracy), data hash and gate decision."""
    from tasks.services.registry import versions

    rows = versions(_model_name(name))
    cols = [
        "version",
        "aliases",
        "accuracy",
        "transfer_gain",
        "gain_over",
        "strategy",
        "candidate",
        "adaptation",
        "gate",
        "evidence",
        "data",
        "git",
        "created",
    ]
    fmt = lambda v: (
        f"{float(v):.4f}"
        if isinstance(v, str) and v.replace(".", "", 1).lstrip("-").isdigit() and "." in v
        else str(v or "")
    )
    table = [[fmt(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(c), *(len(t[i]) for t in table)) for i, c in enumerate(cols)]
    typer.echo("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    for t in table:
        typer.echo("  ".join(v.ljust(w) for v, w in zip(t, widths)))


@app.command()
def promote(
    name: str,
    version: int,
    why: str = typer.Option(..., "--why", help="reason, stored on the version"),
    who: str | None = typer.Option(None, help="defaults to the current user"),
):
    """Make VERSION the champion explicitly (outside the gate); records who and why."""
    from tasks.services.registry import promote as do

    r = do(name, version, why, who)
    typer.echo(f"{name}: champion is now version {r['champion']} (was {r['previous']})")


@app.command()
def rollback(name: str, why: str = typer.Option(..., "--why"), who: str | None = typer.Option(None)):
    """Move champion back to the version the current champion replaced."""
    from tasks.services.registry import rollback as do

    r = do(name, why, who)
    typer.echo(f"{name}: champion rolled back from version {r['replaced']} to {r['champion']}")


@app.command()
def rank(
    candidate: list[str] = typer.Option(
        [],
        "--candidate",
        help="ARCH[:WEIGHTS] to score (repeatable); WEIGHTS a "
        "file or a torchvision weights name; no WEIGHTS: random init",
    ),
    source: bool = typer.Option(True, help="include the project's models/source.pt when it exists"),
    params: Path = typer.Option(Path("params.yaml"), help="params file"),
    set_: list[str] = typer.Option([], "-S", "--set", help="param overrides, e.g. -S data.labels_per_class=5"),
    validator: str = typer.Option(
        "auto",
        help="with 0 target labels: the label-free score to rank by "
        "(entropy | im | snd | bnm; auto: the one the selection benchmark found best)",
    ),
    as_json: bool = typer.Option(False, "--json", help="print the ranking as JSON"),
):
    """Rank candidate source models / backbones for the target before training: LogME on their penultimate
    features, LEEP and NCE on their source classifier, over the labeled target budget (never the test split);
    with data.labels_per_class = 0, label-free validators of their predictions on the unlabeled target pool."""
    import json

    from tasks.cli.rank import rank as do
    from tasks.cli.rank import table
    from tasks.project.config import ParamsError, load_params
    from tasks.project.stage import StageError

    try:
        # ranking trains nothing, so finetune.strategy is not its business: a labeled-only strategy in
        # params.yaml must not stop `tl rank -S data.labels_per_class=0`
        r = do(
            load_params(params, [*set_, "finetune.strategy=auto"]),
            candidate,
            include_source=source,
            validator=validator,
        )
    except (ParamsError, StageError, ValueError, FileNotFoundError) as e:
        _fail(e)
    typer.echo(json.dumps(r, indent=2) if as_json else table(r))


@app.command()
def tune(
    params: Path = typer.Option(Path("params.yaml"), help="params file"),
    set_: list[str] = typer.Option([], "-S", "--set", help="param overrides, e.g. -S 'tune.lr=[0.001,0.01]'"),
    apply: bool = typer.Option(
        False,
        "--apply",
        help="write the best configuration into params.yaml "
        "(as `dvc exp apply`); without it the workspace is left as it is",
    ),
    fresh: bool = typer.Option(False, "--fresh", help="start the search over instead of resuming it"),
    as_json: bool = typer.Option(False, "--json", help="print the result as JSON"),
):
    """Search strategy x learning rate x strategy params (the `tune:` section) with Ray Tune and ASHA; the
    objective is validation accuracy when data.val_per_class > 0, else the label-free tune.validator. Needs
    the data and pretrain stages' outputs; resumes an interrupted search; every trial goes to MLflow."""
    import contextlib
    import json

    from tasks.cli.tune import table
    from tasks.cli.tune import tune as do
    from tasks.project.config import ParamsError, load_params
    from tasks.project.stage import StageError
    from tasks.services.lock import ProjectLocked, project_lock
    from tasks.services.tracking import project_root

    try:  # one run at a time: a search reads data/ and models/, and --apply writes params.yaml
        with (
            project_lock(project_root(params.resolve().parent), "tl tune " + " ".join(f"-S {s}" for s in set_)),
            contextlib.redirect_stdout(sys.stderr) if as_json else contextlib.nullcontext(),
        ):  # stdout: JSON only
            r = do(
                load_params(params, set_), fresh=fresh, apply_to=params if apply else None, verbose=0 if as_json else 1
            )
    except (ParamsError, StageError, ProjectLocked) as e:
        _fail(e)
    typer.echo(json.dumps(r, indent=2) if as_json else table(r))
    if apply:
        typer.echo(f"params: applied {' '.join(r['overrides'])} to {params}", err=as_json)


FORMATS = ("tsv", "csv", "json")


def _prediction_line(r: dict, fmt: str, top_k: int) -> str:
    """One result: tsv ``path class confidence`` (+ class/confidence pairs for --top-k), csv the same with a
    header, json one object per line."""
    import csv
    import io
    import json

    if fmt == "json":
        obj = {"path": r["path"], "class": r["class"], "confidence": round(r["confidence"], 4)}
        if top_k > 1:
            obj["top_k"] = [{"class": c, "confidence": round(p, 4)} for c, p in r["top"]]
        return json.dumps(obj, ensure_ascii=False)
    cells = [r["path"]] + [v for c, p in r["top"] for v in (c, f"{p:.3f}" if fmt == "tsv" else f"{p:.4f}")]
    if fmt == "tsv":
        return "\t".join(cells)
    buf = io.StringIO()
    csv.writer(buf, lineterminator="").writerow(cells)
    return buf.getvalue()


@app.command()
def reproduce(
    spec: str = typer.Argument(..., help="NAME/VERSION or NAME@alias, e.g. digits-transfer/3"),
    tolerance: float = typer.Option(0.3, help="accuracy agreement required, in points"),
    register: bool = typer.Option(
        False, "--register", help="register the replay (tagged reproduces=VERSION; never champion)"
    ),
    allow_dirty: bool = typer.Option(False, "--allow-dirty", help="replay a version made from uncommitted code"),
    workdir: Path | None = typer.Option(None, help="replay here (kept) instead of a temporary folder"),
    as_json: bool = typer.Option(False, "--json", help="print the comparison as JSON"),
):
    """Replay a registered model from its lineage (commit, params, dvc.lock, data from the DVC remote) and
    compare metrics and per-image predictions with the original; exit 1 when accuracy differs by more
    than --tolerance."""
    from tasks.cli.reproduce import ReproduceError, summary_json, table
    from tasks.cli.reproduce import reproduce as do

    try:
        r = do(spec, tolerance / 100, register, allow_dirty, workdir)
    except ReproduceError as e:
        _fail(e)
    typer.echo(summary_json(r) if as_json else table(r))
    if r.get("registered_version"):
        typer.echo(
            f"registered the replay as {r['model_name']} version {r['registered_version']} "
            f"(reproduces={r['version']}; aliases unchanged)",
            err=as_json,
        )
    verdict = "reproduced" if r["ok"] else "NOT reproduced"
    typer.echo(
        f"{verdict}: accuracy within {tolerance} points is {'yes' if r['ok'] else 'no'} ({r['seconds']} s)", err=as_json
    )
    if not r["ok"]:
        raise typer.Exit(1)


@app.command()
def predict(
    paths: list[Path] = typer.Argument(..., help="image files, folders (searched recursively) or quoted globs"),
    name: str | None = typer.Option(None, help="registered model name (default: register.model_name)"),
    alias: str = typer.Option("champion"),
    model: str | None = typer.Option(
        None,
        "--model",
        help="the version to use: NAME@ALIAS, NAME/VERSION, "
        "@ALIAS or VERSION (default: --name's --alias, the champion)",
    ),
    top_k: int = typer.Option(1, "--top-k", min=1, help="the K most likely classes with their probabilities"),
    fmt: str = typer.Option("tsv", "--format", help="tsv | csv (with a header) | json (one object per line)"),
):
    """Classify images with the champion (or another alias or version: --model), printing each result as it is
    computed; files that cannot be read are listed at the end (exit status 1)."""
    from tasks.modeling.serving import predict as do
    from tasks.services.registry import RegistryError, parse_model

    if fmt not in FORMATS:
        _fail(ValueError(f"--format {fmt!r}: use one of {', '.join(FORMATS)}"))
    version = None
    if model is not None:
        try:
            name, alias, version = parse_model(model, name or _model_name(None))
        except RegistryError as e:
            _fail(e)
    failed, header = [], fmt == "csv"
    for r in do(paths, _model_name(name), alias, top_k, version=version):
        if "error" in r:
            failed.append(r["error"])
            continue
        if header:
            header = False
            typer.echo(
                ",".join(
                    ["path", "class", "confidence"]
                    + [f"{c}_{i}" for i in range(2, len(r["top"]) + 1) for c in ("class", "confidence")]
                )
            )
        typer.echo(_prediction_line(r, fmt, top_k))
    if failed:
        typer.secho(f"{len(failed)} file(s) could not be classified:\n  " + "\n  ".join(failed), fg="red", err=True)
        raise typer.Exit(1)


@app.command()
def serve(
    cron: str | None = typer.Option(None, help="cron schedule for retraining (default: 0 3 * * *, 03:00 every day)"),
    interval: float | None = typer.Option(
        None, min=1, help="retrain every this many seconds instead (the first run one interval from now)"
    ),
    name: str | None = typer.Option(None, help="deployment name (default: retrain-<project folder>)"),
):
    """Serve the `retrain` flow on a cron or interval schedule from this machine (Ctrl-C stops).

    Uses PREFECT_API_URL if set; otherwise starts a local Prefect server (with its scheduler and UI)
    for as long as this command runs, since Prefect's ephemeral API never fires schedules."""
    import signal

    from flows.local_server import prefect_api
    from tasks.services.tracking import project_root

    def stop(*_):
        raise KeyboardInterrupt  # a `kill` stops the local Prefect server too, as Ctrl-C does

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGHUP, stop)  # a closed terminal
    if cron is not None and interval is not None:
        _fail(
            ValueError(
                f"tl serve: give --cron or --interval, not both (got --cron {cron!r} and --interval "
                f"{interval:g}); a deployment served here has one schedule"
            )
        )
    schedule = {"interval": interval} if interval is not None else {"cron": cron or "0 3 * * *"}
    root = project_root()
    name = name or f"retrain-{root.name}"
    with prefect_api(root / ".tlcache" / "prefect-server.log") as url:
        typer.echo(f"Prefect API {url} (UI: {url.removesuffix('/api')})")
        from flows.retrain import retrain

        when = f"every {interval:g} s" if interval is not None else f"with cron {schedule['cron']!r}"
        typer.echo(f"serving deployment retrain/{name} {when} for {root}")
        try:
            # limit=1: a run that outlasts the interval, or runs missed while down, never overlap in one repo
            retrain.serve(name=name, parameters={"repo": str(root)}, limit=1, **schedule)
        except KeyboardInterrupt:
            typer.echo("stopped")


@app.command()
def submit(
    address: str = typer.Option(
        ...,
        envvar="TL_RAY_ADDRESS",
        help="Ray dashboard / job server, e.g. http://HEAD:8265 (default: $TL_RAY_ADDRESS, which `tl stack env` sets)",
    ),
    set_: list[str] = typer.Option([], "-S", "--set", help="param overrides for the job"),
    allow_local: bool = typer.Option(
        False,
        "--allow-local",
        help="submit although the registry is a local "
        "sqlite file or the DVC remote a local path (a Ray head on this machine)",
    ),
    env_file: str | None = typer.Option(
        None,
        "--env-file-on-cluster",
        help="KEY=VALUE file that exists on the cluster's nodes (credentials); the job reads it, only its path travels",
    ),
    follow_logs: bool = typer.Option(False, "--follow", help="stream the job's logs until it ends"),
):
    """Submit the pipeline to a Ray cluster as a Ray Job: the code only (no .git, .env*, data, models, local
    stores), addresses but never credentials; the job runs in its own directory, pushes its DVC outputs to the
    team remote and registers into the shared registry. Refuses a local registry or remote (see --allow-local)."""
    from tasks.cli.jobs import SubmitRefused, check_stores
    from tasks.services.tracking import project_root

    root = project_root()
    try:
        stores = check_stores(root, allow_local)  # before anything else: a refusal needs no Ray, no torch
    except SubmitRefused as e:
        _fail(e)
    if stores["local"]:
        typer.echo(
            f"--allow-local: the job registers into {stores['tracking_uri']} and pushes to "
            f"{stores['remote_url'] or '(no remote: nothing is pushed)'}, as seen from the node that runs it"
        )
    _checked(root / "params.yaml", set_)
    from tasks.cli.jobs import follow
    from tasks.cli.jobs import submit as do

    job_id = do(address, set_, root, allow_local=allow_local, env_file=env_file)
    typer.echo(f"submitted job {job_id}")
    typer.echo(
        f"follow it:  tl status {job_id} --address {address}   |   tl logs {job_id} --address {address} --follow"
    )
    if follow_logs:
        for chunk in follow(address, job_id):
            typer.echo(chunk, nl=False)


@app.command()
def status(job_id: str, address: str = typer.Option(..., envvar="TL_RAY_ADDRESS", help="e.g. http://HEAD:8265")):
    """Status of a submitted job (PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED); once it has finished, the model
    version it registered and the gate's decision (from its logs)."""
    from tasks.cli.jobs import FINISHED, registration
    from tasks.cli.jobs import logs as job_logs
    from tasks.cli.jobs import status as do

    state = do(address, job_id)
    typer.echo(state)
    if state in FINISHED:
        lines = registration(job_logs(address, job_id))
        if not lines:
            typer.echo(f"registered: nothing (no register stage in the logs: `tl logs {job_id} --address {address}`)")
        for i, line in enumerate(lines):
            typer.echo(("registered: " if i == 0 else "  ") + line)


@app.command()
def logs(
    job_id: str,
    address: str = typer.Option(..., envvar="TL_RAY_ADDRESS"),
    follow_logs: bool = typer.Option(False, "--follow"),
):
    """Logs of a submitted job."""
    from tasks.cli.jobs import follow
    from tasks.cli.jobs import logs as do

    if follow_logs:
        for chunk in follow(address, job_id):
            typer.echo(chunk, nl=False)
    else:
        typer.echo(do(address, job_id))


stack_app = typer.Typer(
    no_args_is_help=True,
    help="The shared stack on this machine: S3 object store, MLflow server, "
    "Prefect server + worker, Ray head (ports in infra/stack.env; credentials made per stack in .tlstack/).",
)
app.add_typer(stack_app, name="stack")
_ENV_FILE = typer.Option(None, "--env-file", help="ports and bucket names (default: infra/stack.env)")
_STATE = typer.Option(None, "--dir", help="state, logs and pids (default: .tlstack/ in the project)")


@stack_app.command("up")
def stack_up(
    env_file: Path | None = _ENV_FILE,
    state: Path | None = _STATE,
    timeout: float = typer.Option(180, help="seconds to wait for each server"),
):
    """Start the stack (only what is not running yet) and wait until every server answers from the process it
    started; print its addresses (no secret: `eval "$(tl stack env)"` exports them with the credentials)."""
    from tasks.services.stack import SECRETS_FILE, STATE_DIR, StackError, up
    from tasks.services.tracking import project_root

    try:
        env = up(project_root(), env_file, state, timeout, say=lambda m: typer.echo(m, err=True))
    except StackError as e:
        _fail(e)
    typer.echo("".join(f"{k}={v}\n" for k, v in env.items()), nl=False)
    where = (state or project_root() / STATE_DIR).resolve()
    typer.echo(f'credentials: {where / SECRETS_FILE} (0600); to use the stack: eval "$(tl stack env)"', err=True)


@stack_app.command("down")
def stack_down(state: Path | None = _STATE):
    """Stop what `tl stack up` started (the recorded processes, nothing else). The data, databases and
    credentials in .tlstack/ stay for the next `tl stack up`."""
    from tasks.services.stack import down
    from tasks.services.tracking import project_root

    down(project_root(), state, say=typer.echo)


@stack_app.command("env")
def stack_env(env_file: Path | None = _ENV_FILE, state: Path | None = _STATE):
    """Print the lines to export to use the stack, credentials included (`eval "$(tl stack env)"`)."""
    from tasks.services.stack import STATE_DIR, StackError, default_env_file, export_lines, settings, status
    from tasks.services.tracking import project_root

    root = project_root()
    where = (state or root / STATE_DIR).resolve()
    if not any(status(root, where).values()):
        typer.secho("warning: the stack is not running here (`tl stack up`)", fg="yellow", err=True)
    if env_file is None and (where / "env").is_file():  # what the running stack was started with (ports too)
        typer.echo((where / "env").read_text(), nl=False)
        return
    try:
        s = settings(env_file or default_env_file(root, where), where)
        if "AWS_SECRET_ACCESS_KEY" not in s:
            raise StackError(f"no stack credentials under {where} yet: `tl stack up` makes them")
        typer.echo(export_lines(s), nl=False)
    except StackError as e:
        _fail(e)


def main() -> None:
    """Console entry point: one-paragraph errors; `tl --debug ...` shows the traceback."""
    from tasks.project.env import configure_environment

    configure_environment()
    try:
        app()
    except Exception as e:  # noqa: BLE001 - the CLI's last line of defence
        if "--debug" in sys.argv:
            raise
        typer.secho(f"error: {e}\n(run `tl --debug ...` for the full traceback)", fg="red", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
