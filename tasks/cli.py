"""The ``tl`` command. Heavy imports (torch, dvc, mlflow, prefect, ray) happen inside commands."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import List, Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Transfer-learning pipeline: DVC-versioned data, source pretraining, transfer, evaluation, "
                       "compression and gated MLflow registration.")
STATE = {"debug": False}


@app.callback()
def _main(debug: bool = typer.Option(False, "--debug", help="show full tracebacks on errors")):
    STATE["debug"] = debug


def _fail(err: Exception) -> None:
    if STATE["debug"]:
        raise err
    typer.secho(f"error: {err}", fg="red", err=True)
    raise typer.Exit(2)


def _env() -> dict:
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    env.setdefault("DO_NOT_TRACK", "1")
    env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    return env


def _dvc(*args: str, check: bool = True) -> int:
    dvc = Path(sys.executable).parent / "dvc"
    r = subprocess.run([str(dvc) if dvc.exists() else "dvc", *args], env=_env())
    if check and r.returncode != 0:
        _fail(RuntimeError(f"`dvc {' '.join(args)}` failed (exit {r.returncode}); see the output above."))
    return r.returncode


def write_overrides(params_file: Path, overrides: list[str]) -> None:
    """Apply ``-S key=value`` to params.yaml in place, keeping comments (as ``dvc exp run -S`` does)."""
    from ruamel.yaml import YAML

    from .config import parse_override

    y = YAML()
    y.preserve_quotes = True
    with params_file.open() as f:
        doc = y.load(f)
    for item in overrides:
        keys, val = parse_override(item)
        node = doc
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = val
    with params_file.open("w") as f:
        y.dump(doc, f)


@app.command()
def run(
    set_: List[str] = typer.Option([], "-S", "--set", help="override a param, DVC syntax: -S finetune.strategy=dann"),
    params: Path = typer.Option(Path("params.yaml"), help="params file"),
    force: bool = typer.Option(False, help="rerun every stage even if nothing changed"),
    push: bool = typer.Option(True, help="push data and models to the DVC remote afterwards"),
):
    """Run the whole pipeline with `dvc repro` (only stages whose inputs changed run)."""
    from .config import ParamsError, load_params

    try:
        p = load_params(params, set_)
    except ParamsError as e:
        _fail(e)
    if set_:
        write_overrides(params, set_)
        typer.echo(f"params: applied {' '.join(set_)} to {params}")
    _dvc("repro", *(["--force"] if force else []))
    if push:
        _dvc("push", "--quiet", check=False)
    reports = p.path("reports")
    typer.echo("\nDone.")
    typer.echo(f"  report:  {reports / 'report.md'}  (figures in {reports / 'figures'})")
    typer.echo(f"  metrics: {reports / 'metrics.json'}, {reports / 'compress.json'}  (dvc metrics show)")
    reg = reports / "registration.json"
    if reg.is_file():
        import json

        r = json.loads(reg.read_text())
        typer.echo(f"  model:   {r['model_uri']} ({'champion' if r['promoted'] else 'challenger, not promoted'}) "
                   f"in {r['tracking_uri']}")


@app.command()
def check(params: Path = typer.Option(Path("params.yaml")),
          set_: List[str] = typer.Option([], "-S", "--set")):
    """Validate params.yaml (and overrides) without running anything."""
    from .config import ParamsError, load_params

    try:
        load_params(params, set_)
    except ParamsError as e:
        _fail(e)
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


if __name__ == "__main__":
    app()
