"""A Ray Train run's identity, checkpoint discovery and probes, without Ray (fast)."""

from __future__ import annotations

import os
import time

import pytest
import torch
from faults import Fault, FaultInjector

from tasks.project.config import Params
from tasks.services.ray_checkpoints import latest_on_disk
from tasks.services.ray_runs import mark_done, resolve_run

MANIFEST = {"source": {"splits": {"train": "a"}}, "target": {"splits": {"train": "b"}}}


def _save(path, epoch, mtime):
    path.parent.mkdir(parents=True)
    torch.save({"epoch": epoch}, path)
    os.utime(path, (mtime, mtime))


def test_latest_checkpoint_on_disk_skips_one_cut_short_by_a_crash(tmp_path):
    now = time.time()
    _save(tmp_path / "checkpoint_a" / "state.pt", 1, now - 30)
    _save(tmp_path / "local" / "epoch_0002" / "state.pt", 2, now - 20)
    assert latest_on_disk(str(tmp_path))["epoch"] == 2
    cut = tmp_path / "checkpoint_b" / "state.pt"
    _save(cut, 3, now - 10)
    cut.write_bytes(cut.read_bytes()[:100])  # the crash came mid-write
    os.utime(cut, (now - 10, now - 10))
    assert latest_on_disk(str(tmp_path))["epoch"] == 2
    assert latest_on_disk(str(tmp_path / "nothing")) is None and latest_on_disk(None) is None


def test_a_run_resumes_under_its_name_until_it_is_marked_done(tmp_path):
    params = Params.model_validate({"ray": {"storage_path": str(tmp_path)}})
    name, storage, run_dir = resolve_run("finetune", params, MANIFEST)
    assert name.startswith("finetune-") and run_dir == tmp_path / name and storage == str(tmp_path)
    assert resolve_run("finetune", params, MANIFEST)[0] == name  # same params, data and code: resume
    other = Params.model_validate({"ray": {"storage_path": str(tmp_path)}, "finetune": {"lr": 0.5}})
    assert resolve_run("finetune", other, MANIFEST)[0] != name
    # the same params (finetune.strategy auto) but another measured pick: never the other strategy's checkpoint
    assert resolve_run("finetune", params, MANIFEST, "mcc")[0] != resolve_run("finetune", params, MANIFEST, "semi")[0]
    run_dir.mkdir()
    mark_done(run_dir, 3)
    fresh, _, fresh_dir = resolve_run("finetune", params, MANIFEST)
    assert fresh.startswith(name + "-") and fresh_dir == tmp_path / fresh  # never resumes a finished run


def test_fault_fires_once_on_its_worker_step(tmp_path, monkeypatch):
    exits = []
    monkeypatch.setattr(os, "_exit", exits.append)
    fault = Fault(str(tmp_path / "fired"), epoch=2, step=1, rank=1)
    FaultInjector(fault, rank=0).on_step_end(None, 1, 1)  # another worker
    FaultInjector(fault, rank=1).on_step_end(None, 0, 1)  # epoch 1
    assert exits == []
    FaultInjector(fault, rank=1).on_step_end(None, 1, 1)
    assert exits == [1] and (tmp_path / "fired").read_text() == str(os.getpid())
    FaultInjector(fault, rank=1).on_step_end(None, 1, 1)  # the restarted worker gets past it
    assert exits == [1]
    with pytest.raises(TypeError):
        Fault()  # a marker is required: without one the fault would fire on every restart
