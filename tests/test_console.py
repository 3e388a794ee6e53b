"""A console a person can read (tasks/console.py, issue 11 section 5): one line per epoch, rounded numbers, Ray's
chatter dropped on the driver unless --verbose / TL_VERBOSE=1. The real multi-worker run's output is checked in
tests/test_ray_cluster.py; here the pieces, fast."""
from __future__ import annotations

import pytest

from tasks import console

EPOCH = {"epoch": 2, "train_loss": 0.41234567, "train_images_per_s": 2310.4, "epoch_time_s": 4.0}


def test_epoch_line_is_rounded_for_people():
    line = console.epoch_line("finetune", {**EPOCH, "val_accuracy": 0.7648147940635681}, 6, 14.2, 16.0)
    assert line == "[finetune] epoch 2/6  loss 0.412  val acc 76.5 %  2,310 img/s  0:14 elapsed  ETA 0:16"
    last = console.epoch_line("pretrain", {**EPOCH, "epoch": 6}, 6, 3725, 0.0)  # no validation split, no ETA
    assert last == "[pretrain] epoch 6/6  loss 0.412  2,310 img/s  1:02:05 elapsed"
    assert console.OURS.match(line) and console.OURS.match("[finetune w0] resumed")


def test_epoch_callback_prints_once_per_epoch_with_a_falling_eta():
    said = []
    cb = console.EpochLine("pretrain", 3, said.append)
    for e in (1, 2, 3):
        cb.on_epoch_end({**EPOCH, "epoch": e, "epoch_time_s": 2.0}, None)
    assert [s.split("  ")[0] for s in said] == ["[pretrain] epoch 1/3", "[pretrain] epoch 2/3", "[pretrain] epoch 3/3"]
    assert said[0].endswith("ETA 0:04") and said[1].endswith("ETA 0:02") and "ETA" not in said[2]


@pytest.fixture()
def ray_stream(monkeypatch):
    """Ray's real driver-side stream dispatcher with its usual printer registered, as ray.init(log_to_driver=True)
    leaves it; restored afterwards."""
    import functools

    from ray._private import worker
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as d

    monkeypatch.setenv("RAY_COLOR_PREFIX", "0")
    saved = list(d.handlers)
    d.handlers = [("ray_print_logs", functools.partial(worker.print_to_stdstream, ignore_prefix=False))]
    yield d
    d.handlers = saved


def _batch(lines, actor="RayTrainWorker", pid=4242):
    return {"ip": "10.0.0.1", "localhost": "10.0.0.1", "pid": pid, "actor_name": actor, "task_name": "",
            "is_err": False, "lines": lines}


# lines as Ray 2.60 prints them in a 1-worker run (tests/test_ray_cluster.py shows them with --verbose)
NOISE = ["Requesting resources: {'CPU': 2.0} * 1",
         "Checkpoint successfully created at: Checkpoint(filesystem=local, path=/r/checkpoint_2026-11-29_19-35-31)",
         "Reporting training result 1: TrainingReport(checkpoint=Checkpoint(filesystem=local, path=/r), "
         "metrics={'epoch': 1, 'train_loss': 2.102515284220378}, validation=False) from rank 0",
         "[2026-11-29 19:35:28,225 E 17500 17586] core_worker.cc:2465: Actor with class name: 'PreemptionWatcher' "
         "and ID: '3a26' has constructor arguments in the object store and max_restarts > 0."]


def test_ray_noise_is_dropped_and_our_lines_lose_rays_prefix(ray_stream, monkeypatch, capsys):
    monkeypatch.delenv(console.VERBOSE_ENV, raising=False)
    assert console.filter_ray_output()
    ray_stream.emit(_batch(["[pretrain] epoch 1/3  loss 2.103", NOISE[1], "user warning: something real",
                            NOISE[2], "[pretrain] epoch 2/3  loss 1.610"]))
    ray_stream.emit(_batch([NOISE[0], NOISE[3]], actor="TrainController", pid=17500))
    ray_stream.emit(_batch(["Failed to query Ray Train Controller actor state. State API may be temporarily "
                            "unavailable.", "Traceback (most recent call last):"], actor="PlacementGroupCleaner"))
    out = capsys.readouterr().out.splitlines()
    assert out == ["[pretrain] epoch 1/3  loss 2.103", "(RayTrainWorker pid=4242) user warning: something real",
                   "[pretrain] epoch 2/3  loss 1.610"]


def test_verbose_keeps_everything_ray_prints(ray_stream, monkeypatch, capsys):
    monkeypatch.setenv(console.VERBOSE_ENV, "1")
    assert console.verbose() and not console.filter_ray_output()
    assert console.train_logging_config().log_level == "INFO" and console.ray_log_level() == "WARNING"
    ray_stream.emit(_batch(NOISE[:2]))
    assert "Checkpoint successfully created at" in capsys.readouterr().out
    monkeypatch.setenv(console.VERBOSE_ENV, "0")
    assert console.train_logging_config().log_level == "WARNING" and console.ray_log_level() == "ERROR"


def test_report_draws_no_empty_validation_panel(tmp_path):
    from tasks.report import pct, training_curves

    hist = [{"epoch": 1, "train_loss": 1.0}, {"epoch": 2, "train_loss": 0.5}]
    assert training_curves({"finetune": hist, "scratch": []}, tmp_path / "a.png") == 1
    with_val = [{**h, "val_accuracy": 0.5} for h in hist]
    assert training_curves({"finetune": with_val, "pretrain": hist}, tmp_path / "b.png") == 2
    assert (tmp_path / "a.png").stat().st_size > 1000 and pct(None) == "n/a" and pct(0.7648147940635681) == "76.5 %"


def test_verbose_flags_reach_the_stages(tmp_path, monkeypatch):
    """`python -m tasks.<stage> --verbose` and `tl run --verbose` set TL_VERBOSE for the stage (and every stage
    DVC or Prefect starts from there)."""
    import os
    import shutil

    from typer.testing import CliRunner

    from helpers import ROOT
    from tasks import cli
    from tasks.stage import stage_main

    monkeypatch.setenv(console.VERBOSE_ENV, "0")  # recorded first, so teardown leaves TL_VERBOSE as it found it
    seen = []
    stage_main(lambda p: seen.append(console.verbose()), [], load=lambda path, overrides: None)
    stage_main(lambda p: seen.append(console.verbose()), ["--verbose"], load=lambda path, overrides: None)
    assert seen == [False, True]
    monkeypatch.delenv(console.VERBOSE_ENV)
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cli, "_dvc", lambda *args, **kw: seen.append((args[0], os.environ.get(console.VERBOSE_ENV))) or 0)
    r = CliRunner().invoke(cli.app, ["run", "--verbose"])
    assert r.exit_code == 0, r.output
    assert seen[2:] == [("repro", "1"), ("push", "1")]
