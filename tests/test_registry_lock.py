"""The registry lock (tasks/lock.py): mutual exclusion through the tracking store, so it holds across machines."""
from __future__ import annotations

import threading
import time

import pytest


@pytest.fixture
def client(tmp_path):
    from mlflow import MlflowClient

    return MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")


def test_registry_lock_excludes_waits_and_takes_over_stale(client):
    from tasks.lock import REGISTRY_LOCK_SUFFIX, RegistryLocked, registry_lock

    order = []

    def second():
        with registry_lock(client, "m", "second", wait_s=30):
            order.append("second in")

    with registry_lock(client, "m", "first"):
        t = threading.Thread(target=second)
        t.start()
        time.sleep(1.5)
        order.append("first out")  # the second waited for the first
        with pytest.raises(RegistryLocked, match="not released within 0 s"):
            with registry_lock(client, "m", "third", wait_s=0):
                pass
    t.join(timeout=30)
    assert order == ["first out", "second in"]
    assert not client.search_registered_models(f"name = 'm{REGISTRY_LOCK_SUFFIX}'")  # released
    client.create_registered_model("m" + REGISTRY_LOCK_SUFFIX, tags={"holder": "dead:1", "since": "0", "what": "x"})
    with registry_lock(client, "m", "after a crash", wait_s=5, stale_s=60):  # a dead holder's lock is taken over
        assert client.get_registered_model("m" + REGISTRY_LOCK_SUFFIX).tags["what"] == "after a crash"
