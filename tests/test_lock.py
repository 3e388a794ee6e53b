"""The project lock lives as long as any process of the run: real `tl run`, real `dvc repro`, a real stage."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import ROOT, env, sh

pytestmark = pytest.mark.slow

# a stage that says it started, then runs until the test says "go" (at most 60 s)
WAIT = """
import os, pathlib, time
pathlib.Path("stage.pid").write_text(str(os.getpid()))
end = time.time() + 60
while not pathlib.Path("go").exists() and time.time() < end:
    time.sleep(0.05)
"""


def _alive(pid: int) -> bool:
    from tasks.services.lock import pid_alive

    return pid_alive(pid) and "Z" not in Path(f"/proc/{pid}/stat").read_text().split(")")[-1][:3]


def _wait_for(cond, timeout: float, what: str) -> None:
    end = time.time() + timeout
    while not cond():
        assert time.time() < end, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_killing_tl_run_keeps_the_project_locked_until_its_stage_ends(tmp_path):
    """`tl run` killed with SIGKILL (no cleanup) while `dvc repro` runs a stage: the next `tl run -S` is refused,
    names the survivors and writes nothing, as long as the stage lives; once it ends, the lock is free."""
    from tasks.services.lock import ProjectLocked, project_lock

    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    (proj / "wait.py").write_text(WAIT)
    (proj / "dvc.yaml").write_text("stages:\n  wait:\n    cmd: python wait.py\n")
    sh(Path(sys.executable).parent / "dvc", "init", "--no-scm", "-q", cwd=proj)
    tl = [sys.executable, "-m", "tasks.cli.main", "run", "--no-push"]  # this checkout's `tl` (PYTHONPATH)
    e = {**env(), "PYTHONPATH": str(ROOT)}
    first = subprocess.Popen(tl, cwd=proj, env=e, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    stage = None
    try:
        _wait_for(lambda: (proj / "stage.pid").is_file() and (proj / "stage.pid").read_text(), 60, "the stage")
        stage = int((proj / "stage.pid").read_text())
        first.send_signal(signal.SIGKILL)
        first.wait()
        assert _alive(stage)
        params = (proj / "params.yaml").read_bytes()
        r = sh(*tl, "-S", "finetune.lr=0.01", cwd=proj, check=False, extra_env={"PYTHONPATH": str(ROOT)})
        assert r.returncode == 2 and "holds the project lock" in r.stderr, r.stdout + r.stderr
        msg = " ".join(r.stderr.split())
        assert f"pid {first.pid} has exited" in msg and "Traceback" not in msg
        # names the survivor, and only it (not the refused taker, which has the file open too)
        assert re.search(r"still holds the lock \(.*\): pid \d+ \(`[^`]*dvc repro`\)\. The lock", msg), msg
        assert (proj / "params.yaml").read_bytes() == params  # nothing written under the running stage
        (proj / "go").write_text("")
        _wait_for(lambda: not _alive(stage), 30, "the stage to end")
        deadline = time.time() + 30
        while True:  # `dvc repro` ends right after its stage
            try:
                with project_lock(proj, "the test"):
                    break
            except ProjectLocked:  # until dvc has exited
                assert time.time() < deadline, "the lock outlived the run's last process"
                time.sleep(0.1)
    finally:
        (proj / "go").write_text("")
        first.kill()
