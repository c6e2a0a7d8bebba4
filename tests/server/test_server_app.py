"""The ServerApp records how every run ends: no run stays "running" (or "starting") without one.

Flower calls the ServerApp object with a Grid and a Context; these failures
happen before the first message, so no Grid is needed to reach them.
"""

import pytest
from flwr.app import Context, RecordDict

from dropfleet.common.errors import ConfigError, DatasetError
from dropfleet.server.app import app
from dropfleet.server.store import Store


def run_server_app(run_id, run_config):
    app(None, Context(run_id=run_id, node_id=0, node_config={}, state=RecordDict(), run_config=run_config))


@pytest.fixture
def store_url(tmp_path):
    return f"sqlite:///{tmp_path / 'store.db'}"


def test_a_serverapp_without_its_data_set_ends_failed(tmp_path, store_url, monkeypatch):
    monkeypatch.setenv("DROPFLEET_DATA_DIR", str(tmp_path / "no-data-here"))
    with pytest.raises(DatasetError):
        run_server_app(41, {"store-url": store_url, "results-file": str(tmp_path / "r.jsonl")})
    run = Store(store_url).get_run("41")
    assert run["status"] == "failed" and run["finished_at"] is not None
    assert "DatasetError" in run["error"] and "no-data-here" in run["error"]


def test_a_serverapp_that_cannot_write_its_results_ends_failed(tmp_path, store_url):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(OSError):
        run_server_app(42, {"store-url": store_url, "results-file": str(blocker / "run.jsonl")})
    run = Store(store_url).get_run("42")
    assert run["status"] == "failed" and "a-file" in run["error"]


def test_a_run_registered_by_the_api_fails_when_its_config_is_refused(store_url):
    store = Store(store_url)
    store.migrate()
    store.register_run("43", "dropback", "mlp-90k", 0, 5, {"no-such-key": 1})
    assert store.get_run("43")["status"] == "starting"
    with pytest.raises(ConfigError):
        run_server_app(43, {"store-url": store_url, "no-such-key": 1})
    run = store.get_run("43")
    assert run["status"] == "failed" and "no-such-key" in run["error"]
