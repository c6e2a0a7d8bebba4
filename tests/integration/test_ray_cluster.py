"""Simulation on a Ray cluster: `dropfleet simulate --ray-address` attaches to it, or fails early.

A two-node Ray cluster on this machine (`ray start --block`, explicit non-default
ports, a small object store, its own temp dir), stopped by its PIDs — never
`ray stop`, which would kill every Ray process on the machine.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from dropfleet.server.simulation import check_ray_cluster
from tests.integration.procs import free_port, processes_mentioning

pytestmark = pytest.mark.e2e
BIN = Path(sys.executable).parent
DROPFLEET = str(BIN / "dropfleet")


def _ports(n: int) -> list[int]:
    return [free_port() for _ in range(n)]


def _node_args(head_port: int | None) -> list[str]:
    node_manager, object_manager, metrics, env_agent, agent_grpc, agent_http = _ports(6)
    workers = free_port()
    args = [
        "--num-cpus=1",
        "--object-store-memory=80000000",
        "--node-ip-address=127.0.0.1",
        "--disable-usage-stats",
        f"--node-manager-port={node_manager}",
        f"--object-manager-port={object_manager}",
        f"--metrics-export-port={metrics}",
        f"--runtime-env-agent-port={env_agent}",
        f"--dashboard-agent-grpc-port={agent_grpc}",
        f"--dashboard-agent-listen-port={agent_http}",
        f"--min-worker-port={workers}",
        f"--max-worker-port={workers + 30}",
    ]
    if head_port is None:
        return args
    return [
        "--head",
        f"--port={head_port}",
        "--include-dashboard=false",
        f"--ray-client-server-port={free_port()}",
        *args,
    ]


@pytest.fixture(scope="module")
def ray_cluster():
    # Short paths: Ray's unix sockets live under its temp dir (108-byte limit).
    root = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))
    head_port = free_port()
    address = f"127.0.0.1:{head_port}"
    procs = []
    try:
        for i, head in enumerate((True, False)):
            tmp = root / f"n{i}"
            tmp.mkdir()
            args = (
                [*_node_args(head_port), f"--temp-dir={tmp}"]
                if head
                else ["--address", address, *_node_args(None)]
            )
            log = (root / f"node{i}.log").open("w")
            procs.append(
                subprocess.Popen(
                    [str(BIN / "ray"), "start", *args, "--block"],
                    env={**os.environ, "RAY_TMPDIR": str(tmp)},
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
            deadline = time.monotonic() + 120
            while True:
                assert all(p.poll() is None for p in procs), (root / f"node{i}.log").read_text()[-3000:]
                try:
                    if check_ray_cluster(address, timeout=60).nodes == i + 1:
                        break
                except Exception:
                    pass
                assert time.monotonic() < deadline, (root / f"node{i}.log").read_text()[-3000:]
                time.sleep(2)
        # --node-ip-address keeps Ray on loopback (it would advertise the host's interface address).
        assert check_ray_cluster(address).hosts == ("127.0.0.1",)
        yield address
    finally:
        for p in reversed(procs):
            _stop_group(p)
        shutil.rmtree(root, ignore_errors=True)


def _stop_group(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def test_simulate_runs_clientapps_on_every_node_of_the_cluster(ray_cluster, tmp_path):
    audit = tmp_path / "audit.jsonl"
    done = subprocess.run(
        [
            DROPFLEET, "simulate", "--ray-address", ray_cluster, "--nodes", "2", "--rounds", "1",
            "--results", str(tmp_path / "run.jsonl"), "--flwr-home", str(tmp_path / "flwr"),
            "-c", "fleet-mix=jetson-8g", "-c", "train-subset=100", "-c", "fraction-evaluate=0.0",
            "-c", f"message-audit={audit}",
        ],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "2 node(s), 2 CPU(s)" in done.stdout
    nodes = {json.loads(line)["ray_node"] for line in audit.read_text().splitlines()}
    assert len(nodes) == 2 and None not in nodes, nodes  # ClientApp actors ran on both Ray nodes
    assert processes_mentioning(str(tmp_path / "flwr")) == []  # the managed SuperLink was stopped


def test_simulate_refuses_a_cluster_that_is_not_there(tmp_path):
    home = tmp_path / "flwr"
    done = subprocess.run(
        [DROPFLEET, "simulate", "--ray-address", f"127.0.0.1:{free_port()}", "--flwr-home", str(home)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    last = done.stderr.strip().splitlines()[-1]
    assert done.returncode == 2 and "cannot attach to the Ray cluster at 127.0.0.1:" in last, last
    assert not home.exists()  # no SuperLink, no private Ray started instead
