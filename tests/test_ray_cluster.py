"""Ray Train through the real stages as separate processes: driver interruption and a two-node cluster."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import env, make_repo, sh

from tasks.project.env import free_port

pytestmark = pytest.mark.slow
RAY = Path(sys.executable).parent / "ray"


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    r = make_repo(
        tmp_path_factory.mktemp("raycluster") / "repo",
        {"data": {"synth_per_class": 100}, "pretrain": {"epochs": 6, "batch_size": 32}},
    )
    sh(sys.executable, "-m", "tasks.stages.data", cwd=r)
    return r


def _epochs(log_dir: Path, rank: int = 0) -> list[int]:
    f = log_dir / f"rank{rank}.jsonl"
    return [json.loads(x)["epoch"] for x in f.read_text().splitlines()] if f.exists() else []


def test_driver_interrupt_then_rerun_resumes(repo, tmp_path):
    """Also the console (tasks/project/console.py): the first run with TL_VERBOSE=1 shows Ray Train's own lines, the
    rerun by default one line per epoch and none of Ray's chatter."""
    e = {**env(), "TL_WORKER_LOG_DIR": str(tmp_path)}
    args = [sys.executable, "-m", "tasks.stages.pretrain", "-S", "ray.num_workers=1"]
    proc = subprocess.Popen(
        args, cwd=repo, env={**e, "TL_VERBOSE": "1"}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    deadline = time.time() + 240
    while len(_epochs(tmp_path)) < 2 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert len(_epochs(tmp_path)) >= 2, "the first run never reached epoch 2"
    proc.send_signal(signal.SIGINT)  # Ctrl-C
    try:
        out1, _ = proc.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        proc.kill()
        out1, _ = proc.communicate()
    assert proc.returncode != 0 and not (repo / "models" / "source.pt").exists()
    assert "Requesting resources" in out1 and "Ray Train run 'pretrain-" in out1, out1[-3000:]  # --verbose: Ray's too
    done_before = _epochs(tmp_path)
    assert len(done_before) < 6, "interrupted too late to test resumption"
    r = subprocess.run(args, cwd=repo, env=e, capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    log = r.stdout + r.stderr
    assert "resumed from checkpoint after epoch" in log
    resumed_at = int(log.split("resumed from checkpoint after epoch")[1].split()[0])
    assert resumed_at >= 2
    after = _epochs(tmp_path)[len(done_before) :]
    assert after == list(range(resumed_at + 1, 7))  # continued, nothing from before the checkpoint redone
    lines = log.splitlines()
    for epoch in after:  # once each, without Ray's "(RayTrainWorker pid=...)" prefix
        assert sum(ln.startswith(f"[pretrain] epoch {epoch}/6  loss ") for ln in lines) == 1, log
    for noise in (
        "PreemptionWatcher",
        "Failed to query Ray Train Controller",
        "Token authentication",
        "Checkpoint successfully created",
        "TrainingReport(",
        "Requesting resources",
    ):
        assert noise not in log, (noise, log)
    assert lines[-1].startswith("pretrain: source test accuracy ") and lines[-1].endswith(" %")
    assert (repo / "models" / "source.pt").exists()
    hist = json.loads((repo / "reports" / "pretrain.json").read_text())["history"]
    assert [h["epoch"] for h in hist] == [1, 2, 3, 4, 5, 6]


@pytest.fixture
def two_node_cluster(tmp_path):
    port, dash = free_port(), free_port()
    e = {"RAY_AUTH_MODE": "token"}  # `ray start` nodes authenticate with ~/.ray/auth_token
    common = ["--num-cpus=1", "--node-ip-address=127.0.0.1", "--disable-usage-stats"]
    sh(RAY, "get-auth-token", "--generate", cwd=tmp_path, extra_env=e)  # a fresh machine may have no token yet
    try:
        sh(
            RAY,
            "start",
            "--head",
            f"--port={port}",
            "--include-dashboard=true",  # the job server's address, which `tl submit` asks about the nodes
            f"--dashboard-port={dash}",
            '--resources={"node_a": 1}',
            *common,
            cwd=tmp_path,
            extra_env=e,
        )
        sh(RAY, "start", f"--address=127.0.0.1:{port}", '--resources={"node_b": 1}', *common, cwd=tmp_path, extra_env=e)
        deadline = time.time() + 60
        while time.time() < deadline:
            st = sh(RAY, "status", f"--address=127.0.0.1:{port}", cwd=tmp_path, extra_env=e, check=False)
            if st.stdout.count(" node_") >= 2:
                break
            time.sleep(1)
        yield f"127.0.0.1:{port}", e, f"http://127.0.0.1:{dash}"
    finally:
        sh(RAY, "stop", "--force", cwd=tmp_path, extra_env=e, check=False)


def test_two_node_cluster_finetune(repo, tmp_path, two_node_cluster, monkeypatch):
    """Two nodes: `tl submit` refuses a relative checkpoint folder before sending anything (it would be one node's);
    finetune proves its storage folder is seen by both nodes before training, finds that both see the streamed target
    split as it does (so stages nothing; tests/test_shard_staging.py stages and fetches), then puts one worker on
    each."""
    from tasks.cli.jobs import SubmitRefused, check_storage

    address, e, dashboard = two_node_cluster
    for k, v in e.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(SubmitRefused, match=r"relative folder 'ray_results'.*\(2 nodes\)"):
        check_storage(dashboard, [], repo)
    check_storage(dashboard, [f"ray.storage_path={tmp_path / 'shared'}"], repo)  # absolute: proven by the job
    check_storage(dashboard, ["ray.storage_path=s3://ray-checkpoints/x"], repo)
    sh(sys.executable, "-m", "tasks.stages.pretrain", "-S", "pretrain.epochs=1", cwd=repo)  # local mode source model
    e = {**e, "TL_WORKER_LOG_DIR": str(tmp_path)}
    r = subprocess.run(
        [sys.executable, "-m", "tasks.stages.finetune", "-S", f"ray.address={address}", "-S", "ray.num_workers=2"]
        + ["-S", "data.hold_in_memory_mib=0"],  # streamed from the shards
        cwd=repo,
        env={**env(), **e},
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    recs = [json.loads(x) for rank in (0, 1) for x in (tmp_path / f"rank{rank}.jsonl").read_text().splitlines()]
    nodes = {rec["node"] for rec in recs}
    assert len(nodes) == 2, nodes  # one worker on each node
    assert "checkpoint storage " in r.stdout + r.stderr and " is seen by all 2 nodes" in r.stdout + r.stderr
    assert (repo / "models" / "finetuned.pt").exists()
    out = r.stdout + r.stderr
    # what the staging and the storage proof ask of each node: a task pinned there looks for the path (and its bytes)
    import hashlib

    import ray

    from tasks.services.ray_runs import blind_nodes, live_nodes, worker_nodes

    ray.init(address=address, logging_level="WARNING")
    try:
        nodes = live_nodes()
        digest = hashlib.sha256((repo / "params.yaml").read_bytes()).hexdigest()
        assert len(nodes) == 2 and blind_nodes(repo / "params.yaml", nodes) == []
        assert blind_nodes(repo / "params.yaml", nodes, digest=digest) == []
        assert blind_nodes(repo / "params.yaml", nodes, digest="0" * 64) == nodes  # another version there
        assert blind_nodes(repo / "no-such-file", nodes) == nodes
        gone = "ab" * (len(nodes[0]) // 2)  # a node that is not there cannot say it sees anything
        assert blind_nodes(repo / "params.yaml", [*nodes, gone], timeout_s=10) == [gone]
        # where a worker may be placed, so where a staged split is fetched before training: 1 CPU each, no GPU
        assert sorted(worker_nodes({"CPU": 1})) == sorted(nodes) and worker_nodes({"CPU": 2}) == []
        assert worker_nodes({"CPU": 1, "GPU": 1}) == [] and sorted(worker_nodes({"CPU": 1, "GPU": 0})) == sorted(nodes)
    finally:
        ray.shutdown()
    assert "staging " not in out and "fetched the prepared split" not in out, out[-2000:]  # every node sees data/
    assert not (repo / "ray_results" / "shards").exists()
