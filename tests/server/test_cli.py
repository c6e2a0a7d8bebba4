"""`dropfleet status|runs|model|nodes` against a real API server."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dropfleet.common.wire.codec import decode
from tests.integration.procs import free_port, stop
from tests.server.live_api import fill, start_api

DROPFLEET = str(Path(sys.executable).parent / "dropfleet")


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    live = start_api(tmp_path_factory.mktemp("cli"))
    live.models = fill(live.store)
    yield live
    stop([live.proc])


def cli(*args, api_url):
    return subprocess.run([DROPFLEET, *args, "--api", api_url], capture_output=True, text=True, timeout=60)


def test_status_human_and_json(api):
    human = cli("status", api_url=api.url)
    assert human.returncode == 0 and "latest run 101" in human.stdout and "70.00%" in human.stdout
    data = json.loads(cli("status", "--json", api_url=api.url).stdout)
    assert data["ready"] == "ready" and data["latest_round"]["round"] == 2


def test_runs_and_fleet(api):
    assert "101" in cli("runs", api_url=api.url).stdout
    runs = json.loads(cli("runs", "--json", api_url=api.url).stdout)
    assert runs[0]["rounds"][-1]["accuracy"] == pytest.approx(0.7)
    nodes = json.loads(cli("nodes", "--json", api_url=api.url).stdout)
    assert {n["node_id"] for n in nodes} == {"7", "8"}


def test_model_download_decodes(api, tmp_path):
    out = tmp_path / "model.pb"
    done = cli("model", "--run", "101", "--out", str(out), "--json", api_url=api.url)
    info = json.loads(done.stdout)
    assert out.read_bytes() == api.models[-1] and info["k"] == decode(out.read_bytes()).num_tracked
    first = tmp_path / "first.pb"
    assert cli("model", "--run", "101", "--round", "1", "--out", str(first), api_url=api.url).returncode == 0
    assert first.read_bytes() == api.models[1]


def test_model_exports_as_a_torch_state_dict_and_onnx(api, tmp_path):
    import onnxruntime
    import torch

    from dropfleet.common.device.export import dense_model
    from dropfleet.common.model.torch_model import build_model

    want = dense_model(decode(api.models[-1]))
    images = torch.randn(5, 1, 28, 28)
    with torch.no_grad():
        logits = want(images).numpy()
    pt, onnx = tmp_path / "model.pt", tmp_path / "model.onnx"
    assert cli("model", "--run", "101", "--format", "pt", "--out", str(pt), api_url=api.url).returncode == 0
    loaded = build_model("mlp-90k")
    loaded.load_state_dict(torch.load(pt))
    with torch.no_grad():
        assert np.array_equal(loaded.eval()(images).numpy(), logits)
    done = cli("model", "--run", "101", "--format", "onnx", "--out", str(onnx), api_url=api.url)
    assert done.returncode == 0, done.stderr
    session = onnxruntime.InferenceSession(str(onnx))
    [got] = session.run(["logits"], {"image": images.numpy()})
    assert np.allclose(got, logits, atol=1e-4)
    bad = cli("model", "--run", "101", "--format", "tflite", "--out", str(pt), api_url=api.url)
    assert bad.returncode == 2 and "--format must be one of protobuf, pt, onnx" in bad.stderr


def test_ids_are_never_cut(api):
    long_id = "18446744073709551615"
    api.store.start_run(long_id, "dropback", "mlp-90k", 0, 1, {})
    listed = cli("runs", api_url=api.url)  # piped: no terminal width to fit
    assert listed.returncode == 0 and long_id in listed.stdout.replace("\n", "").replace("│", "").replace(
        " ", ""
    )


def test_errors_are_clear(api, tmp_path):
    missing = cli("model", "--run", "999", "--out", str(tmp_path / "x.pb"), api_url=api.url)
    assert missing.returncode == 1 and "run 999 not found" in missing.stderr
    malformed = cli("model", "--run", "nosuchrun", "--out", str(tmp_path / "x.pb"), api_url=api.url)
    last = malformed.stderr.strip().splitlines()[-1]
    assert malformed.returncode == 1 and "run_id: String should match pattern" in last and "[{" not in last
    down = cli("status", api_url=f"http://127.0.0.1:{free_port()}")
    assert down.returncode == 1 and "cannot reach" in down.stderr


def test_fleet_restart_needs_a_fleet(tmp_path):
    done = subprocess.run(
        [DROPFLEET, "fleet", "restart", "--state-dir", str(tmp_path)], capture_output=True, text=True
    )
    assert done.returncode == 1 and "has no fleet to restart" in done.stderr


def test_help_names_every_strategy_and_model():
    from dropfleet.common.model.registry import MODELS
    from dropfleet.fleet.config import STRATEGIES

    text = subprocess.run(
        [DROPFLEET, "simulate", "--help"], capture_output=True, text=True, env=_wide()
    ).stdout
    assert all(name in text for name in (*STRATEGIES, *MODELS)), text


def test_fleet_up_refuses_a_missing_data_set_before_starting_anything(tmp_path):
    state = tmp_path / "fleet"
    done = subprocess.run(
        [DROPFLEET, "fleet", "up", "--state-dir", str(state)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**_wide(), "DROPFLEET_DATA_DIR": str(tmp_path / "nothing")},
    )
    last = done.stderr.strip().splitlines()[-1]
    assert done.returncode == 1 and "Fashion-MNIST" in last and "dataset-fashion-mnist" in last, last
    assert not (state / "pids").exists()  # nothing was started


def _wide() -> dict[str, str]:
    import os

    return {**os.environ, "COLUMNS": "200"}
