"""Simulation on a Ray cluster: `dropfleet simulate --ray-address` attaches to it, or fails early.

A two-node Ray cluster on this machine (`ray start --block`, explicit non-default
ports, a small object store, its own temp dirs), stopped by its PIDs — never
`ray stop`, which would kill every Ray process on the machine. Ray turns
127.0.0.1 into the host's interface address (`resolve_ip_for_localhost`), and its
only switch against that also forbids worker nodes; so the cluster and the
simulation run in a network namespace this test creates, whose only interface
is loopback, where Ray's address detection falls back to 127.0.0.1.
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

from tests.integration.procs import free_port, processes_mentioning

pytestmark = pytest.mark.e2e
BIN = Path(sys.executable).parent
DROPFLEET = str(BIN / "dropfleet")


_TAKEN: set[int] = set()  # every port handed out here: the OS may offer a just-released one again


def _ports(n: int, span: int = 1) -> list[int]:
    """`n` free ports, none handed out before, each with the `span` - 1 ports after it free of those too."""
    out: list[int] = []
    while len(out) < n:
        port = free_port()
        block = set(range(port, port + span))
        if block & _TAKEN:
            continue
        _TAKEN.update(block)
        out.append(port)
    return out


def _node_args(head_port: int | None) -> list[str]:
    node_manager, object_manager, metrics, env_agent, agent_grpc, agent_http = _ports(6)
    [workers] = _ports(1, span=31)
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
        f"--ray-client-server-port={_ports(1)[0]}",
        *args,
    ]


def _probe(ns: list[str], address: str) -> dict:
    """`check_ray_cluster` from inside the namespace."""
    code = (
        "import json, sys; from dropfleet.server.simulation import check_ray_cluster as c; "
        "print(json.dumps(c(sys.argv[1], timeout=60).__dict__))"
    )
    done = subprocess.run(
        [*ns, sys.executable, "-c", code, address], capture_output=True, text=True, timeout=120
    )
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-500:])
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def netns():
    name = f"dfray{os.getpid()}"
    if (
        shutil.which("ip") is None
        or subprocess.run(["ip", "netns", "add", name], capture_output=True).returncode
    ):
        pytest.skip("cannot create a network namespace here (needs root and iproute2)")
    try:
        subprocess.run(["ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"], check=True)
        yield ["ip", "netns", "exec", name]
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


@pytest.fixture(scope="module")
def ray_cluster(netns):
    # Short paths: Ray's unix sockets live under its temp dir (108-byte limit).
    root = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))
    [head_port] = _ports(1)
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
                    [*netns, str(BIN / "ray"), "start", *args, "--block"],
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
                    if _probe(netns, address)["nodes"] == i + 1:
                        break
                except RuntimeError:
                    pass
                assert time.monotonic() < deadline, (root / f"node{i}.log").read_text()[-3000:]
                time.sleep(2)
        assert _probe(netns, address)["hosts"] == ["127.0.0.1"]  # every node on loopback
        yield netns, address
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
    netns, address = ray_cluster
    audit = tmp_path / "audit.jsonl"
    done = subprocess.run(
        [
            *netns, DROPFLEET, "simulate", "--ray-address", address, "--nodes", "2", "--rounds", "1",
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
