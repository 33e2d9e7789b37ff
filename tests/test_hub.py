"""The hub is probed once per process; a failed probe switches everything to offline mode, said once."""

import logging
import os

from harness import hub


def test_failed_probe_goes_offline_once(monkeypatch, caplog):
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "https://127.0.0.1:9")  # discard port: refused at once
    hub.hub_available.cache_clear()
    monkeypatch.setattr(hub, "_noticed", set())
    calls = []
    real = hub.socket.create_connection
    monkeypatch.setattr(hub.socket, "create_connection", lambda *a, **k: (calls.append(a), real(*a, **k))[1])
    with caplog.at_level(logging.WARNING, logger="harness"):
        assert hub.hub_available() is False
        assert hub.hub_available() is False
    assert len(calls) == 1 and calls[0][0] == ("127.0.0.1", 9)
    assert os.environ["HF_HUB_OFFLINE"] == "1" and os.environ["HF_DATASETS_OFFLINE"] == "1"
    assert sum("not reachable" in r.getMessage() for r in caplog.records) == 1
    hub.hub_available.cache_clear()


def test_offline_env_never_probes(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub.hub_available.cache_clear()
    monkeypatch.setattr(hub.socket, "create_connection", lambda *a, **k: (_ for _ in ()).throw(AssertionError("probed")))
    assert hub.hub_available() is False
    hub.hub_available.cache_clear()
