"""A Prefect API for long-lived local use (``tl serve``): the configured one, or a server started here.

Prefect's ephemeral API (what a flow uses without ``PREFECT_API_URL``) runs no scheduler, so a
deployment served against it never fires ("Cannot schedule flows on an ephemeral server"). For a
schedule on one machine, :func:`prefect_api` starts ``prefect server start`` on a free local port
for as long as the block runs, and points this process at it. Prefect is only run as a command
here, never imported, so the URL is set before Prefect reads its settings.
"""

from __future__ import annotations

import os
import subprocess
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

from tasks.project.env import configure_environment, free_port, tool


@contextmanager
def prefect_api(log_path: Path, timeout_s: float = 240):
    """Yield the API URL: ``PREFECT_API_URL`` if set, else a local server's, stopped at the end."""
    if os.environ.get("PREFECT_API_URL"):
        yield os.environ["PREFECT_API_URL"]
        return
    configure_environment()
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [tool("prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=dict(os.environ),
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"the local Prefect server exited ({proc.returncode}) while starting; its log: {log_path}"
                )
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"the local Prefect server did not answer within {timeout_s:.0f} s; "
                    f"its log: {log_path}. Or set PREFECT_API_URL to a running server."
                )
            time.sleep(1)
        os.environ["PREFECT_API_URL"] = url
        yield url
    finally:
        os.environ.pop("PREFECT_API_URL", None)
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
