"""Device dropout: SuperNodes killed mid-run; rounds go on with those that answer, nothing is lost."""

import json
import os
import signal
import time

import httpx

from tests.deploy.test_fleet_e2e import free_range, run
from tests.integration.procs import free_port


def test_run_survives_killed_supernodes(tmp_path):
    state = tmp_path / "fleet"
    up = run(
        "fleet",
        "up",
        "--nodes",
        "3",
        "--profiles",
        "jetson-8g",
        "--state-dir",
        str(state),
        "--api-port",
        str(free_port()),
        "--superlink-port",
        str(free_port()),
        "--node-port-base",
        str(free_range(3)),
        "--json",
        timeout=240,
    )
    try:
        assert up.returncode == 0, up.stderr + up.stdout
        api = json.loads(up.stdout)["api"]
        auth = {"Authorization": f"Bearer {(state / 'admin-token').read_text()}"}
        run_id = httpx.post(
            f"{api}/v1/runs",
            headers=auth,
            timeout=120,
            json={
                "run_config": {
                    "num-server-rounds": 4,
                    "train-subset": 300,
                    "fraction-evaluate": 0.0,
                    "min-available-nodes": 2,  # the survivors must be enough to sample
                    "min-train-nodes": 2,
                    "round-timeout": 30.0,
                }
            },
        ).json()["run_id"]
        deadline = time.monotonic() + 240
        while (
            len(
                httpx.get(f"{api}/v1/runs/{run_id}/rounds").json()
                if httpx.get(f"{api}/v1/runs/{run_id}").status_code == 200
                else []
            )
            < 2
        ):
            assert time.monotonic() < deadline, "round 1 never published"
            time.sleep(1)
        for name in ("supernode-2", "superexec-clientapp-2"):  # the device loses power
            os.killpg(json.loads((state / "pids" / f"{name}.json").read_text())["pid"], signal.SIGKILL)
        events = []
        with httpx.stream("GET", f"{api}/v1/runs/{run_id}/events", timeout=600) as stream:
            for line in stream.iter_lines():
                if line.startswith("data:"):
                    events.append(json.loads(line[5:]))
        rounds = [e for e in events if "round" in e]
        assert [r["round"] for r in rounds] == [0, 1, 2, 3, 4]  # none lost, none twice
        assert events[-1] == {"status": "finished"}
        assert rounds[1]["replied"] == 3
        assert all(r["replied"] == 2 for r in rounds[3:])  # the survivors carried on
        assert rounds[4]["accuracy"] >= rounds[1]["accuracy"] - 0.05
    finally:
        run("fleet", "down", "--state-dir", str(state))
