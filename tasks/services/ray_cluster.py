"""The Ray cluster a training run uses: connecting to it and what it offers."""

from __future__ import annotations

import os
from pathlib import Path

from tasks.project.config import Params

# what init_ray asked of the Ray it started: {(node id, job id) of that connection: log_to_driver}
_LOG_TO_DRIVER: dict[tuple[str, str], bool] = {}


def init_ray(params: Params) -> bool:
    """Connect to ``ray.address`` / ``RAY_ADDRESS``, or start a local Ray. Returns whether what Ray's workers print
    reaches this driver (``log_to_driver``): only with ``--verbose``; otherwise a Ray Train run forwards its
    training function's lines itself (:mod:`tasks.project.console`). A Ray this process started some other way
    (a test's own ``ray.init``) is used as it is and taken to have Ray's default, ``log_to_driver=True``."""
    import ray

    from tasks.project.console import log_to_driver, ray_env, ray_log_level

    if ray.is_initialized():
        return _LOG_TO_DRIVER.get(_connection(), True)
    ray_env()
    address = params.ray.address or os.environ.get("RAY_ADDRESS")
    code_root = str(Path(__file__).resolve().parents[2])
    env = {"env_vars": {"PYTHONPATH": code_root + os.pathsep + os.environ.get("PYTHONPATH", "")}}
    shown = log_to_driver()  # Ray's chatter only with --verbose
    ray.init(
        address=address,
        runtime_env=env,
        include_dashboard=False,
        log_to_driver=shown,
        configure_logging=True,
        logging_level=ray_log_level(),
    )
    _LOG_TO_DRIVER[_connection()] = shown
    return shown


def _connection() -> tuple[str, str]:
    """This driver's Ray connection: a fresh local Ray has a new node id, a new connection to a cluster a new job."""
    import ray

    ctx = ray.get_runtime_context()
    return ctx.get_node_id(), ctx.get_job_id()


def cluster_cpus() -> list[dict]:
    """``{"CPU": n, "GPU": g}`` of every live node with CPUs."""
    import ray

    return [
        {"CPU": n["Resources"]["CPU"], "GPU": n["Resources"].get("GPU", 0.0)}
        for n in ray.nodes()
        if n.get("Alive") and n["Resources"].get("CPU")
    ]


def node_id() -> str:
    """This process's Ray node, or ``"local"`` outside a Ray runtime (local mode)."""
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else "local"
