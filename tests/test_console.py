"""A console a person can read (tasks/project/console.py, issue 11 section 5): one line per epoch, rounded numbers,
Ray's chatter kept off the driver unless --verbose / TL_VERBOSE=1 (``ray.init(log_to_driver=False)``), the training
function's own lines forwarded from the workers and printed there. The pieces here, fast, and one real two-worker run
(slow); tests/test_ray_cluster.py checks a stage process's output, with and without --verbose."""

from __future__ import annotations

import logging
import os
import sys

import pytest

from tasks.project import console

EPOCH = {"epoch": 2, "train_loss": 0.41234567, "train_images_per_s": 2310.4, "epoch_time_s": 4.0}


def test_epoch_line_is_rounded_for_people():
    line = console.epoch_line("finetune", {**EPOCH, "val_accuracy": 0.7648147940635681}, 6, 14.2, 16.0)
    assert line == "[finetune] epoch 2/6  loss 0.412  val acc 76.5 %  2,310 img/s  0:14 elapsed  ETA 0:16"
    last = console.epoch_line("pretrain", {**EPOCH, "epoch": 6}, 6, 3725, 0.0)  # no validation split, no ETA
    assert last == "[pretrain] epoch 6/6  loss 0.412  2,310 img/s  1:02:05 elapsed"
    assert console.OURS.match(line) and console.OURS.match("[finetune w0] resumed")
    assert not console.OURS.match("[fault injection] worker rank 1 exits") and not console.OURS.match("Requesting")


def test_epoch_callback_prints_once_per_epoch_with_a_falling_eta():
    said = []
    cb = console.EpochLine("pretrain", 3, said.append)
    for e in (1, 2, 3):
        cb.on_epoch_end({**EPOCH, "epoch": e, "epoch_time_s": 2.0}, None)
    assert [s.split("  ")[0] for s in said] == ["[pretrain] epoch 1/3", "[pretrain] epoch 2/3", "[pretrain] epoch 3/3"]
    assert said[0].endswith("ETA 0:04") and said[1].endswith("ETA 0:02") and "ETA" not in said[2]


def test_ray_streams_worker_output_to_the_driver_only_with_verbose(monkeypatch):
    """``init_ray``: ``log_to_driver`` (and Ray's log levels) follow --verbose, and a later call on the same
    connection says which was chosen; a Ray started some other way is taken to stream (Ray's default)."""
    import ray

    from tasks.project.config import Params
    from tasks.services import ray_cluster

    calls, up, conn = [], [False], ["node-a", "01000000"]

    class Ctx:
        def get_node_id(self):
            return conn[0]

        def get_job_id(self):
            return conn[1]

    monkeypatch.setattr(ray_cluster, "_LOG_TO_DRIVER", {})
    monkeypatch.setattr(ray, "is_initialized", lambda: up[0])
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(kw) or up.__setitem__(0, True))
    monkeypatch.setattr(ray, "get_runtime_context", Ctx)
    params = Params.model_validate({})
    monkeypatch.delenv(console.VERBOSE_ENV, raising=False)
    assert ray_cluster.init_ray(params) is False and ray_cluster.init_ray(params) is False  # 2nd: already up
    assert len(calls) == 1 and calls[0]["log_to_driver"] is False and calls[0]["logging_level"] == "ERROR"
    assert console.train_logging_config().log_level == "WARNING"
    up[0], conn[0] = False, "node-b"  # a fresh local Ray
    monkeypatch.setenv(console.VERBOSE_ENV, "1")
    assert ray_cluster.init_ray(params) is True
    assert calls[1]["log_to_driver"] is True and calls[1]["logging_level"] == "WARNING"
    assert console.train_logging_config().log_level == "INFO"
    conn[0] = "node-c"  # ray.init(...) by someone else (a test's fixture): Ray's default
    monkeypatch.delenv(console.VERBOSE_ENV)
    assert ray_cluster.init_ray(params) is True and len(calls) == 2


class ListQueue:
    """Stands in for ``ray.util.queue.Queue``: the worker's end (put) and the driver's (get, get_nowait_batch)."""

    def __init__(self, *args, **kwargs):
        import queue

        self.q, self.closed = queue.Queue(), False

    def put(self, item, block=True, timeout=None):
        if self.closed:
            raise RuntimeError("the queue's actor is gone")
        self.q.put(item)

    def get(self, block=True, timeout=None):
        import queue

        from ray.util.queue import Empty

        try:
            return self.q.get(timeout=timeout)
        except queue.Empty:
            raise Empty from None

    def qsize(self):
        return self.q.qsize()

    def get_nowait_batch(self, n):
        return [self.q.get_nowait() for _ in range(n)]

    def shutdown(self, force=False, grace_period_s=5):
        self.closed = True

    def items(self):
        return list(self.q.queue)


class StderrConsole(logging.StreamHandler):
    """Like Ray's worker console handler: writes to whatever ``sys.stderr`` is when it emits."""

    def emit(self, record):
        sys.stderr.write(self.format(record) + "\n")


def test_a_worker_forwards_every_line_it_prints_and_keeps_printing_it(monkeypatch, capsys):
    import warnings

    q = ListQueue()
    root = logging.getLogger()
    handler, level = StderrConsole(), root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)  # as Ray Train sets it on its workers
    try:
        with console.forward_output(q, 1):
            print("[finetune] epoch 1/6  loss 2.103  818 img/s  0:01 elapsed  ETA 0:05")
            sys.stdout.write("[finetune w1] resumed")
            sys.stdout.write(" from checkpoint after epoch 1\n")
            print("[fault injection] worker rank 1 exits hard in epoch 2", flush=True)
            sys.stderr.write(warnings.formatwarning("something real", UserWarning, "train.py", 3))  # as Python warns
            logging.getLogger("/ray/train/v2/_internal/execution/context.py").info(
                "Reporting training result 1: TrainingReport(checkpoint=None, metrics={'epoch': 1})"
            )
            logging.getLogger("tl_test_library").warning("a worker's warning")
            print("unfinished", end="")
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
    assert not handler.filters  # Ray's console handler is as it was after the run
    out = [t for e, t in q.items() if not e]
    err = [t for e, t in q.items() if e]
    assert out == [
        "[finetune] epoch 1/6  loss 2.103  818 img/s  0:01 elapsed  ETA 0:05",
        "[finetune w1] resumed from checkpoint after epoch 1",
        "(worker 1) [fault injection] worker rank 1 exits hard in epoch 2",
        "(worker 1) unfinished",
    ]
    assert err == ["(worker 1) train.py:3: UserWarning: something real", "(worker 1) a worker's warning"]
    seen = capsys.readouterr()  # the worker's own stdout/stderr (its log file under Ray) still get every line
    assert "[finetune w1] resumed from checkpoint after epoch 1\n" in seen.out and seen.out.endswith("unfinished")
    assert "something real" in seen.err and "a worker's warning" in seen.err
    n = len(q.items())
    print("[finetune] after the run")  # no longer forwarded
    assert len(q.items()) == n


def test_forwarding_stays_out_of_forked_children_and_survives_a_lost_driver(monkeypatch, capsys):
    import os

    q = ListQueue()
    with console.forward_output(None, 0):  # --verbose: Ray streams the output itself, nothing is replaced
        assert not isinstance(sys.stdout, console._Tee)
    pid = os.getpid()
    with console.forward_output(q, 0):
        monkeypatch.setattr(os, "getpid", lambda: pid + 1)  # a DataLoader worker forked from this one
        print("[finetune] from a forked child")
        monkeypatch.setattr(os, "getpid", lambda: pid)
        q.shutdown()  # the driver is gone (Ctrl-C): printing goes on, forwarding stops
        print("[finetune] after the driver left")
        print("[finetune] and again")
    assert q.items() == []
    assert capsys.readouterr().out.count("[finetune] ") == 3


def test_the_driver_prints_forwarded_lines_as_they_come_and_the_rest_at_the_end(monkeypatch, capsys):
    import time

    import ray.util.queue

    monkeypatch.setattr(ray.util.queue, "Queue", ListQueue)
    monkeypatch.setattr(console.WorkerOutput, "POLL_S", 0.05)
    with console.WorkerOutput() as output:
        output.queue.put((False, "[pretrain] epoch 1/3  loss 2.103"))
        output.queue.put((True, "(worker 1) UserWarning: something real"))
        out, err, deadline = "", "", time.time() + 10
        while not (out and err) and time.time() < deadline:  # while the run goes on
            time.sleep(0.01)
            seen = capsys.readouterr()
            out, err = out + seen.out, err + seen.err
        assert out == "[pretrain] epoch 1/3  loss 2.103\n" and err == "(worker 1) UserWarning: something real\n"
        output._done.set()  # lines that arrive after the printer's last look
        output._thread.join()
        output.queue.put((False, "[pretrain] epoch 2/3  loss 1.610"))
    seen = capsys.readouterr()
    assert seen.out == "[pretrain] epoch 2/3  loss 1.610\n" and seen.err == ""
    assert output.queue.closed  # the queue's actor is shut down


@pytest.fixture()
def own_ray(monkeypatch):
    """A local Ray that ``init_ray`` starts itself, as a stage does; shut down afterwards."""
    import ray

    from tasks.services import ray_cluster

    if ray.is_initialized():
        pytest.skip("a Ray from another test is still up")
    monkeypatch.setattr(ray_cluster, "_LOG_TO_DRIVER", {})
    monkeypatch.delenv(console.VERBOSE_ENV, raising=False)
    yield
    ray.shutdown()


@pytest.mark.slow
def test_a_ray_train_run_shows_our_lines_once_without_rays_chatter(own_ray, tmp_path, capfd):
    """Two workers, one of which dies in epoch 2: the driver prints rank 0's lines (epochs, "resumed") once each,
    without Ray's prefix, the dying worker's last line after "(worker 1)", and nothing Ray Train logs."""
    from faults import Fault, inject

    from tasks.modeling.ray_train import run_job_ray
    from tasks.modeling.train import TrainJob
    from tasks.project.config import Params
    from tlcore import data, datasets, models, transforms

    x, y = datasets.render_synth_digits(16, seed=0)
    ds = data.ImageDataset.from_numpy(
        x, y, datasets.CLASSES, transforms.build_transform(models.get_spec("smallcnn"), True)
    )
    params = Params.model_validate(
        {
            "base": {"seed": 0},
            "finetune": {"epochs": 3, "steps_per_epoch": 2, "batch_size": 32},
            "ray": {"num_workers": 2, "max_failures": 1, "storage_path": str(tmp_path / "ray_results")},
        }
    )
    job = TrainJob(arch="smallcnn", num_classes=10, strategy="scratch", optim=params.finetune, seed=0, labeled=ds)
    _, history, _ = run_job_ray(
        job,
        params,
        "console",
        {"source": {"splits": {}}, "target": {"splits": {}}},
        callbacks=[inject(Fault(str(tmp_path / "fired"), epoch=2, step=1, rank=1))],
    )
    assert [h["epoch"] for h in history] == [1, 2, 3]
    seen = capfd.readouterr()
    lines = seen.out.splitlines()
    for epoch in (1, 2, 3):
        assert sum(ln.startswith(f"[console] epoch {epoch}/3  loss ") for ln in lines) == 1, seen.out
    assert "[console] resumed from checkpoint after epoch 1" in lines, seen.out
    assert "(worker 1) [fault injection] worker rank 1 exits hard in epoch 2" in lines, seen.out
    assert sum(ln.startswith("[console] training on cpu, 2 worker(s)") for ln in lines) == 2  # before and after
    log = seen.out + seen.err
    for noise in (
        "RayTrainWorker",
        "TrainController",
        "PlacementGroupCleaner",
        "Failed to query Ray Train Controller",
        "PreemptionWatcher",
        "Requesting resources",
        "Started training worker group",
        "Setting up process group",
        "Checkpoint successfully created",
        "TrainingReport(",
        "Token authentication",
    ):
        assert noise not in log, (noise, log)


def test_report_draws_no_empty_validation_panel(tmp_path):
    from tasks.project.report import pct, training_curves

    hist = [{"epoch": 1, "train_loss": 1.0}, {"epoch": 2, "train_loss": 0.5}]
    assert training_curves({"finetune": hist, "scratch": []}, tmp_path / "a.png") == 1
    with_val = [{**h, "val_accuracy": 0.5} for h in hist]
    assert training_curves({"finetune": with_val, "pretrain": hist}, tmp_path / "b.png") == 2
    assert (tmp_path / "a.png").stat().st_size > 1000 and pct(None) == "n/a" and pct(0.7648147940635681) == "76.5 %"


def test_verbose_flags_reach_the_stages(tmp_path, monkeypatch):
    """`python -m tasks.stages.<stage> --verbose` and `tl run --verbose` set TL_VERBOSE for the stage (and every stage
    DVC or Prefect starts from there)."""
    import os
    import shutil

    from helpers import ROOT
    from typer.testing import CliRunner

    from tasks.cli import main as cli
    from tasks.project.stage import stage_main

    monkeypatch.setenv(console.VERBOSE_ENV, "0")  # recorded first, so teardown leaves TL_VERBOSE as it found it
    seen = []
    stage_main(lambda p: seen.append(console.verbose()), [], load=lambda path, overrides: None)
    stage_main(lambda p: seen.append(console.verbose()), ["--verbose"], load=lambda path, overrides: None)
    assert seen == [False, True]
    monkeypatch.delenv(console.VERBOSE_ENV)
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(
        cli, "_dvc", lambda *args, **kw: seen.append((args[0], os.environ.get(console.VERBOSE_ENV))) or 0
    )
    r = CliRunner().invoke(cli.app, ["run", "--verbose"])
    assert r.exit_code == 0, r.output
    assert seen[2:] == [("repro", "1"), ("push", "1")]


def test_a_relative_cache_dir_names_one_folder_for_every_ray_process(tmp_path, monkeypatch):
    """Ray's workers and Tune's trials run in folders of their own: a relative TL_CACHE_DIR is made absolute,
    against the driver's folder, before Ray starts, so they all find the one cache (staged shards, precision)."""
    from tasks.modeling.hardware import cache_dir
    from tasks.project.console import ray_env

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TL_CACHE_DIR", "cache")
    ray_env()
    assert os.environ["TL_CACHE_DIR"] == str(tmp_path / "cache")
    monkeypatch.chdir(tmp_path.parent)  # a worker's folder
    assert cache_dir() == tmp_path / "cache"
    monkeypatch.setenv("TL_CACHE_DIR", "/abs/cache")
    ray_env()
    assert os.environ["TL_CACHE_DIR"] == "/abs/cache"
