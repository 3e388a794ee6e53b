import pytest

from tasks.common import atomic_path, load_checkpoint, save_checkpoint, write_json


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    p = tmp_path / "metrics.json"
    write_json(p, {"accuracy": 0.9})
    with pytest.raises(RuntimeError):
        with atomic_path(p) as tmp:
            tmp.write_text('{"accur')  # interrupted half-way
            raise RuntimeError("killed")
    assert p.read_text().startswith('{\n  "accuracy": 0.9')
    assert [f.name for f in tmp_path.iterdir()] == ["metrics.json"]


def test_checkpoint_roundtrip_weights_only(tmp_path):
    import torch

    from tlcore import models

    m = models.create("smallcnn", 4)
    save_checkpoint(tmp_path / "m.pt", m, ["a", "b", "c", "d"], 1)
    m2, meta = load_checkpoint(tmp_path / "m.pt")
    assert meta["classes"] == ["a", "b", "c", "d"] and meta["arch"] == "smallcnn"
    x = torch.randn(2, 1, 32, 32)
    m.eval(), m2.eval()
    assert torch.equal(m(x), m2(x))
    with pytest.raises(FileNotFoundError, match="dvc repro"):
        load_checkpoint(tmp_path / "missing.pt")


def test_registry_client_leaves_the_environment_alone(tmp_path, monkeypatch):
    """``mlflow.set_tracking_uri`` exports MLFLOW_TRACKING_URI; a flow process that read the registry
    would then send every later DVC stage (a subprocess) to that store."""
    import os

    from tasks.register import client

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    assert client().search_registered_models() == []
    assert "MLFLOW_TRACKING_URI" not in os.environ and (tmp_path / "mlflow.db").is_file()
