"""End to end: `dropfleet fleet up` (TLS), a run started over REST, followed, downloaded, `fleet down`."""

import json
import subprocess
import sys
import time
from pathlib import Path

import httpx

from dropfleet.common.wire.codec import decode
from dropfleet.deploy.fleet import free_port_range
from tests.integration.procs import free_port, processes_mentioning

DROPFLEET = str(Path(sys.executable).parent / "dropfleet")
NODES = 3


def free_range(n: int) -> int:
    return free_port_range(n)


def run(*args, timeout=180):
    return subprocess.run([DROPFLEET, *args], capture_output=True, text=True, timeout=timeout)


def fleet_up(state, nodes, *extra, api_port=None, link_port=None):
    """`dropfleet fleet up --json` on free ports of 127.0.0.1."""
    ports = [
        "--api-port",
        str(api_port or free_port()),
        "--superlink-port",
        str(link_port or free_port()),
        "--node-port-base",
        str(free_range(nodes)),
    ]
    return run(
        "fleet", "up", "--nodes", str(nodes), "--state-dir", str(state), *ports, *extra, "--json", timeout=240
    )


def test_fleet_up_run_over_rest_and_down(tmp_path):
    state = tmp_path / "fleet"
    link_port = free_port()
    up = fleet_up(state, NODES, "--streaming", link_port=link_port)  # devices without dense weights
    try:
        assert up.returncode == 0, up.stderr + up.stdout
        info = json.loads(up.stdout)
        assert info["tls"] is True and Path(info["state_dir"], "certs", "ca.crt").exists()
        supernode = json.loads((state / "pids" / "supernode-0.json").read_text())["cmd"]
        assert "streaming=true" in supernode[supernode.index("--node-config") + 1]
        # The SuperLink speaks TLS only: plain HTTP is refused, the fleet CA verifies it.
        httpx.get(
            f"https://127.0.0.1:{link_port}/health", verify=str(state / "certs" / "ca.crt")
        ).raise_for_status()
        api = info["api"]
        token = (state / "admin-token").read_text()
        before = httpx.get(f"{api}/v1/nodes", params={"online": True}, timeout=60).json()
        assert len(before) == NODES and all(n["online"] for n in before)  # per the SuperLink
        started = httpx.post(
            f"{api}/v1/runs",
            headers={"Authorization": f"Bearer {token}"},
            timeout=120,
            json={
                "run_config": {
                    "num-server-rounds": 2,
                    "train-subset": 300,
                    "min-available-nodes": NODES,
                    "min-train-nodes": NODES,
                    "fraction-evaluate": 0.34,
                }
            },
        )
        assert started.status_code == 202, started.text
        run_id = started.json()["run_id"]
        # Known at once, before its ServerApp starts: no 404 between POST and the first round.
        assert httpx.get(f"{api}/v1/runs/{run_id}").json()["status"] in ("starting", "running")
        events = []
        with httpx.stream("GET", f"{api}/v1/runs/{run_id}/events", timeout=600) as stream:
            for line in stream.iter_lines():
                if line.startswith("data:"):
                    events.append(json.loads(line[5:]))
        rounds = [e for e in events if "round" in e]
        assert [r["round"] for r in rounds] == [0, 1, 2] and events[-1] == {"status": "finished"}
        assert rounds[2]["accuracy"] > rounds[0]["accuracy"] and rounds[2]["replied"] == NODES
        out = tmp_path / "model.pb"
        got = run("model", "--run", run_id, "--out", str(out), "--api", api)
        assert got.returncode == 0, got.stderr
        model = decode(out.read_bytes())
        assert model.num_tracked == 8961 and model.model_id == "mlp-90k"
        nodes = httpx.get(f"{api}/v1/nodes", params={"online": True}, timeout=60).json()
        assert len(nodes) == NODES and all(n["online"] for n in nodes)
        assert json.loads(run("nodes", "--json", "--api", api).stdout)[0]["node_id"] in {
            n["node_id"] for n in nodes
        } and {n["profile"] for n in nodes} == {"mcu-512k", "pi-zero-512m", "pi4-4g"}
        assert all(n["rounds_joined"] == 2 for n in nodes)
        # Each board measured its step peak inside its budget; the mcu's budget only holds row blocks.
        assert all(0 < n["state_bytes"] < n["peak_bytes"] <= n["budget_bytes"] for n in nodes)
        trainers = {n["profile"]: n["trainer"] for n in nodes}
        streamed = {"mcu-512k": "streaming-blocks", "pi-zero-512m": "streaming", "pi4-4g": "streaming"}
        assert trainers == streamed
        # A second, long run is stopped over REST through the SuperLink.
        auth = {"Authorization": f"Bearer {token}"}
        long_run = httpx.post(
            f"{api}/v1/runs",
            headers=auth,
            timeout=120,
            json={"run_config": {"num-server-rounds": 100, "train-subset": 300, "fraction-evaluate": 0.0}},
        ).json()["run_id"]
        stopped = httpx.post(f"{api}/v1/runs/{long_run}/stop", headers=auth, timeout=120)
        assert stopped.status_code == 202, stopped.text
        time.sleep(3)
        assert httpx.get(f"{api}/v1/runs/{long_run}").json()["status"] == "stopped"
        rounds_then = len(httpx.get(f"{api}/v1/runs/{long_run}/rounds").json())
        time.sleep(5)
        assert len(httpx.get(f"{api}/v1/runs/{long_run}/rounds").json()) == rounds_then < 100
        # Paths are the operator's: a REST caller naming one is refused, nothing is started.
        for key, value in (
            ("store-url", f"sqlite:///{tmp_path}/x.db"),
            ("results-file", str(tmp_path / "r")),
        ):
            refused = httpx.post(
                f"{api}/v1/runs", headers=auth, timeout=60, json={"run_config": {key: value}}
            )
            assert refused.status_code == 400 and key in refused.json()["detail"], refused.text
        # A run whose ServerApp dies before it can record anything (here: the server no longer
        # trusts the key the API signs with, so its launcher refuses the app) is marked failed
        # by the API once the SuperLink reports the Flower run finished.
        trusted = state / "trust" / "app-signer.pub"
        trusted.write_text(
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOQBbIpCoffZRHxv2KiFsJE8YJ27tRfeN6pi3GZzLtVT other\n"
        )
        doomed = httpx.post(f"{api}/v1/runs", headers=auth, timeout=120, json={"run_config": {}}).json()[
            "run_id"
        ]
        assert httpx.get(f"{api}/v1/runs/{doomed}").json()["status"] == "starting"
        deadline = time.monotonic() + 120
        while (info := httpx.get(f"{api}/v1/runs/{doomed}").json())["status"] == "starting":
            assert time.monotonic() < deadline, "a run without a ServerApp stayed 'starting'"
            time.sleep(2)
        assert info["status"] == "failed" and "finished:failed" in info["error"], info
    finally:
        down = run("fleet", "down", "--state-dir", str(state))
    assert down.returncode == 0 and "stopped" in down.stdout
    time.sleep(1)
    assert processes_mentioning(str(state)) == []
    assert json.loads(run("fleet", "status", "--json", "--state-dir", str(state)).stdout) == {}
