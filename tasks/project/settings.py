"""The process environment this project reads: every ``TL_*`` variable, in one typed object.

``params.yaml`` says *what* a run computes; these say *where and how* this process runs (paths on this node,
console verbosity, what the submitter or the stack hands down), so they never change a result. The README's
"Environment variables" table lists the same fields (``tests/test_settings.py`` holds it to that).

:func:`settings` reads the environment when called, not at import: a parent sets some of these for the
processes it starts (``--verbose``, the project lock's token), and nothing is cached across that.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """``TL_<FIELD>`` environment variables (case-insensitive); unset ones take these defaults."""

    model_config = SettingsConfigDict(env_prefix="TL_", extra="ignore", frozen=True)

    verbose: bool = Field(
        False, description="show everything Ray prints (set by `--verbose` for the stages a command starts)"
    )
    cache_dir: Path | None = Field(
        None,
        description="this machine's measurements, e.g. the precision choice "
        "(default: `$XDG_CACHE_HOME` or `~/.cache`, then "
        "`transfer-pipeline`)",
    )
    ray_address: str | None = Field(
        None, description="Ray job server for `tl submit/status/logs` (`tl stack env` sets it)"
    )
    job_root: Path | None = Field(
        None, description="where a submitted job copies the project on its node (default: the system temp dir)"
    )
    git_commit: str | None = Field(None, description="set by `tl submit`: the commit of the uploaded copy, for lineage")
    git_dirty: str = Field("unknown", description="set by `tl submit`: whether that copy had uncommitted changes")
    mlflow_artifacts: Path | None = Field(
        None, description="artifact root of a local sqlite MLflow store (default: mlruns/ beside the database)"
    )
    project_lock: str | None = Field(
        None, description="internal: the project lock's token, handed to the processes of the run that holds it"
    )
    worker_log_dir: Path | None = Field(
        None, description="internal: where Ray workers log their epochs and shards (tests read it)"
    )
    project_dir: Path | None = Field(
        None, description="the checkout the team stack's Prefect worker runs (prefect.yaml)"
    )
    stack_host: str | None = Field(
        None,
        description="the host the team stack binds to and is reached at "
        "(infra/stack.env; like every key of that file, the variable "
        "wins)",
    )
    stack_id: str | None = Field(
        None, description="internal: marks the processes `tl stack up` started, so `tl stack down` stops exactly those"
    )


def settings() -> Settings:
    """The ``TL_*`` environment now. A bad value is one clear error naming the variable."""
    try:
        return Settings()
    except ValidationError as e:
        bad = "; ".join(f"TL_{str(err['loc'][0]).upper()}={err.get('input')!r}: {err['msg']}" for err in e.errors())
        raise ValueError(f"environment variable {bad}. Fix or unset it (README: Environment variables).") from None
