"""The Ray cluster a training run uses: connecting to it and what it offers."""
from __future__ import annotations

import os
from pathlib import Path

from .config import Params


def init_ray(params: Params) -> None:
    """Connect to ``ray.address`` / ``RAY_ADDRESS``, or start a local Ray."""
    import ray

    from .console import filter_ray_output, ray_env, ray_log_level

    if ray.is_initialized():
        return
    ray_env()
    address = params.ray.address or os.environ.get("RAY_ADDRESS")
    code_root = str(Path(__file__).resolve().parents[1])
    env = {"env_vars": {"PYTHONPATH": code_root + os.pathsep + os.environ.get("PYTHONPATH", "")}}
    ray.init(address=address, runtime_env=env, include_dashboard=False, log_to_driver=True,
             configure_logging=True, logging_level=ray_log_level())
    filter_ray_output()  # Ray's chatter only with --verbose (tasks/console.py)


def cluster_cpus() -> list[dict]:
    """``{"CPU": n}`` of every live node with CPUs."""
    import ray

    return [{"CPU": n["Resources"]["CPU"]} for n in ray.nodes() if n.get("Alive") and n["Resources"].get("CPU")]


def node_id() -> str:
    """This process's Ray node, or ``"local"`` outside a Ray runtime (local mode)."""
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else "local"
