"""SuperNode authentication end to end: registered nodes join, an unregistered node is refused."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from dropfleet.fleet.flower_env import flower_env
from tests.deploy.test_fleet_e2e import fleet_up, run
from tests.integration.procs import free_port, processes_mentioning, start, stop

BIN = Path(sys.executable).parent


def online_nodes(state: Path) -> list[dict]:
    out = subprocess.run(
        [str(BIN / "flwr"), "supernode", "list", "fleet", "--format", "json"],
        env=flower_env(state / "flwr"),
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    return [n for n in json.loads(out[out.index("{") :])["nodes"] if n["status"] == "online"]


def start_intruder(tmp_path: Path, superlink: str, ca: Path) -> subprocess.Popen:
    """A SuperNode with a key of its own making, which nobody registered; it logs to intruder.log."""
    key = ec.generate_private_key(ec.SECP384R1())
    (tmp_path / "intruder").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
        )
    )
    (tmp_path / "intruder.pub").write_bytes(
        key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    )
    return start(
        [
            str(BIN / "flower-supernode"),
            "--superlink", superlink,
            "--root-certificates", str(ca),
            "--host", "127.0.0.1",
            "--port", str(free_port()),
            "--auth-supernode-private-key", str(tmp_path / "intruder"),
            "--auth-supernode-public-key", str(tmp_path / "intruder.pub"),
            "--max-retries", "3",
            "--max-wait-time", "15",
        ],
        tmp_path / "intruder.log",
        flower_env(tmp_path / "intruder-home"),
    )  # fmt: skip


@pytest.mark.slow  # node auth also guards every fleet in make test; this one probes it alone
def test_only_registered_supernodes_connect(tmp_path):
    state = tmp_path / "fleet"
    link = free_port()
    up = fleet_up(state, 2, "--node-auth", link_port=link)
    intruder = None
    try:
        assert up.returncode == 0, up.stderr + up.stdout
        assert "--enable-supernode-auth" in (state / "pids" / "superlink.json").read_text()
        deadline = time.monotonic() + 60
        while len(online_nodes(state)) < 2:
            assert time.monotonic() < deadline, "registered nodes never came online"
            time.sleep(1)
        intruder = start_intruder(tmp_path, f"127.0.0.1:{link}", state / "certs" / "ca.crt")
        time.sleep(10)
        assert len(online_nodes(state)) == 2  # the intruder never joined
        log = (tmp_path / "intruder.log").read_text()
        assert "SuperNode ID" not in log and "failed" in log.lower()
    finally:
        if intruder is not None:
            stop([intruder])
        run("fleet", "down", "--state-dir", str(state))
    time.sleep(1)
    assert processes_mentioning(str(state)) == []
