"""MLflow access, in one place: which store, a client on it, the champion, the experiment.

The default store is ``sqlite:///<project root>/mlflow.db`` (the project root is the nearest folder
up from the working directory that holds ``dvc.yaml``), so ``tl models`` from a subfolder reads
the same registry and creates no stray database. ``MLFLOW_TRACKING_URI`` overrides it.
"""

from __future__ import annotations

import os
from pathlib import Path

from tasks.project.settings import settings

DEFAULT_DB = "mlflow.db"
DEFAULT_ARTIFACTS = "mlruns"


def project_root(start: str | Path | None = None) -> Path:
    """The nearest folder at or above ``start`` (default: the working directory) with a ``dvc.yaml``."""
    here = Path(start or Path.cwd()).resolve()
    for d in (here, *here.parents):
        if (d / "dvc.yaml").is_file():
            return d
    return here


def tracking_uri(project: str | Path | None = None) -> str:
    """``MLFLOW_TRACKING_URI`` or the project's sqlite file; a relative sqlite path is made absolute
    against the project root (MLflow also caches one store per URI string in a process)."""
    root = project_root(project)
    uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{DEFAULT_DB}"  # set but empty: unset
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri[len(prefix) :].startswith("/"):
        uri = prefix + str(root / uri[len(prefix) :])
    return uri


SECRET_QUERY = ("token", "key", "secret", "password", "passwd", "pwd", "sig", "signature", "credential", "auth")


def uri_secrets(uri: str) -> list[str]:
    """What in ``uri`` would be a credential: its user info (``user:password@``, or a token as the user name, as
    in ``https://TOKEN@host``) and query parameters named like one (``?token=``, ``X-Amz-Signature=`` ...)."""
    from urllib.parse import parse_qsl, urlsplit

    parts = urlsplit(uri)
    found = ["user info"] if "@" in parts.netloc else []
    found += [k for k, _ in parse_qsl(parts.query) if any(w in k.lower() for w in SECRET_QUERY)]
    return found


def public_uri(uri: str) -> str:
    """``uri`` without what :func:`uri_secrets` finds: what a record (registration.json, a tag, a log line) keeps."""
    from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

    if not uri_secrets(uri):
        return uri
    parts = urlsplit(uri)
    query = [(k, v) for k, v in parse_qsl(parts.query) if not any(w in k.lower() for w in SECRET_QUERY)]
    return urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[-1], query=urlencode(query)))


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI, else None."""
    prefix = "sqlite:///"
    return Path(uri[len(prefix) :]) if uri.startswith(prefix) else None


def client(uri: str | None = None):
    """An ``MlflowClient`` on ``uri`` (default :func:`tracking_uri`). It leaves MLflow's global URI alone:
    ``mlflow.set_tracking_uri`` also exports ``MLFLOW_TRACKING_URI``, which every later subprocess
    (a DVC stage run by a flow in the same process) would inherit."""
    import logging

    from mlflow import MlflowClient

    logging.getLogger("mlflow").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    uri = uri or tracking_uri()
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def version_by_alias(c, name: str, alias: str = "champion"):
    """The model version ``name@alias``, or None when the model or the alias does not exist."""
    from mlflow.exceptions import MlflowException

    try:
        return c.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def experiment_id(c, name: str, uri: str | None = None) -> str:
    """The experiment ``name``, created on first use with its artifacts next to a sqlite store."""
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    db = sqlite_path(uri or tracking_uri())
    loc = None
    if db is not None:
        art = settings().mlflow_artifacts or db.parent / DEFAULT_ARTIFACTS
        loc = (art if art.is_absolute() else db.parent / art).resolve().as_uri()
    return c.create_experiment(name, artifact_location=loc)
