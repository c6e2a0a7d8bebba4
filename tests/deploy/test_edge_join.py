"""The edge kit joins a fleet: install.sh into a prefix, then the installed units' command lines
(with node.env expanded as systemd would) start a SuperNode and its SuperExec against a process
fleet's TLS SuperLink, and the board trains a round beside the fleet's own node: on the lean
runtime (no torch installed), on its own data, within a measured bound on its processes' memory."""

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from dropfleet.client.footprint import peak_rss
from dropfleet.common.device.data_files import read_fashion_mnist
from tests.deploy.rest import TWO_NODE_RUN, run_to_end
from tests.deploy.test_fleet_e2e import fleet_up, free_range, run
from tests.integration.procs import free_port

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]
EDGE = ROOT / "deploy" / "edge"
# Everything a pi-zero-512m board runs for a round of mlp-90k (SuperNode + SuperExec + ClientApp,
# each at its peak RSS) stays under this. Measured here: see docs/benchmarks.md (bench/board.py).
# Generous on purpose: it catches torch or datasets creeping back onto a board, not noise.
BOARD_RSS_BOUND = 400 << 20


def read_env(path: Path) -> dict[str, str]:
    """An EnvironmentFile: KEY=VALUE lines, comments and blanks ignored."""
    env = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            env[key.strip()] = value
    return env


SYSTEMD_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def unit_environment(unit: Path, prefix: Path, state: Path) -> dict[str, str]:
    """What systemd gives a unit's process: its default PATH, then the unit's Environment= lines."""
    env = {"PATH": SYSTEMD_PATH}
    for line in unit.read_text().splitlines():
        if line.startswith("Environment="):
            key, _, value = line.removeprefix("Environment=").partition("=")
            env[key] = value.replace("/opt/dropfleet", str(prefix)).replace("/var/lib/dropfleet", str(state))
    return env


def exec_start(unit: Path, env: dict[str, str], prefix: Path) -> list[str]:
    """ExecStart of a unit as systemd runs it: `${VAR}` is one word, `$VAR` splits on spaces."""
    line = next(x for x in unit.read_text().splitlines() if x.startswith("ExecStart="))
    line = line.removeprefix("ExecStart=").replace("/opt/dropfleet", str(prefix))
    words = []
    for word in shlex.split(line):
        if re.fullmatch(r"\$[A-Z_]+", word):
            words += env.get(word[1:], "").split()
        else:
            words.append(re.sub(r"\$\{([A-Z_]+)\}", lambda m: env.get(m.group(1), ""), word))
    return words


def fleet_nodes(api: str) -> int:
    return len(httpx.get(f"{api}/v1/nodes", params={"online": True}, timeout=60).json())


def test_an_installed_edge_board_joins_the_fleet_and_trains(tmp_path):
    prefix, etc = tmp_path / "opt", tmp_path / "etc"
    t0 = time.monotonic()
    wheels = os.environ.get("PIP_FIND_LINKS", "").split()
    torch_source = f"--find-links {wheels[0]}" if wheels else None
    env = {**os.environ, **({"TORCH_SOURCE": torch_source} if torch_source else {})}
    installed = subprocess.run(
        [str(EDGE / "install.sh"), "--prefix", str(prefix), "--etc", str(etc), "--no-systemd"],
        capture_output=True,
        text=True,
        timeout=1800,
        env=env,
    )
    assert installed.returncode == 0, installed.stdout[-2000:] + installed.stderr[-2000:]
    # The board's lean runtime only: no simulation engine, no torch, no datasets, no numba.
    site = prefix / "venv" / "lib" / "python3.11" / "site-packages"
    for package in ("ray", "torch", "datasets", "numba"):
        assert not (site / package).exists(), package
    install_seconds = time.monotonic() - t0

    state = tmp_path / "fleet"
    link = free_port()
    up = fleet_up(state, 1, "--profiles", "jetson-8g", link_port=link)  # always available
    board: list[subprocess.Popen] = []
    try:
        assert up.returncode == 0, up.stderr + up.stdout
        api = json.loads(up.stdout)["api"]
        node_env = read_env(etc / "node.env")
        # The kit's defaults: node authentication on, with the key install.sh made, paths in this etc.
        assert node_env["SUPERLINK"].endswith(":8000")
        assert f"--auth-supernode-private-key {etc}/keys/node_key" in node_env["AUTH_ARGS"]
        assert node_env["TRUSTED_APP_KEYS"] == f"{etc}/app-signer.pub"
        assert oct((etc / "keys" / "node_key").stat().st_mode & 0o777) == "0o600"
        assert oct((etc / "keys" / "superexec-secret").stat().st_mode & 0o777) == "0o600"
        # What the operator hands a board: the CA certificate and the app key, nothing secret.
        for name in ("ca.crt", "app-signer.pub"):
            (etc / name).write_bytes((state / "trust" / name).read_bytes())
        registered = run(
            "fleet", "register-node", str(etc / "keys" / "node_key.pub"), "--state-dir", str(state)
        )
        assert registered.returncode == 0, registered.stderr + registered.stdout
        # The kit's node.env trains lean on the board's own data; here 1,200 real images of it.
        assert 'runtime="lean"' in node_env["NODE_CONFIG"] and "data-dir=" in node_env["NODE_CONFIG"]
        data = tmp_path / "board-data"
        data.mkdir()
        images, labels = read_fashion_mnist("train", indices=np.arange(1200))
        np.savez(data / "train.npz", images=images, labels=labels)
        node_env |= {
            "SUPERLINK": f"127.0.0.1:{link}",
            "RUNTIME_PORT": str(free_range(1)),
            "NODE_CONFIG": f'profile="pi-zero-512m" runtime="lean" data-dir="{data}" partition-id=1',
        }
        home = tmp_path / "var-lib-dropfleet"  # the units' StateDirectory
        home.mkdir()
        for unit in ("dropfleet-supernode.service", "dropfleet-superexec.service"):
            # Not this test's environment: only what the unit and node.env give the process.
            process_env = {"HOME": str(home), **unit_environment(EDGE / unit, prefix, home), **node_env}
            cmd = exec_start(EDGE / unit, node_env, prefix)
            assert cmd[0].startswith(str(prefix / "venv" / "bin")), cmd
            log = (tmp_path / f"{unit}.log").open("w")
            board.append(
                subprocess.Popen(
                    cmd, env=process_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
                )
            )
            time.sleep(2)
        token = (state / "admin-token").read_text()
        deadline = time.monotonic() + 120
        while fleet_nodes(api) < 2:  # the fleet's own node and the board
            assert time.monotonic() < deadline, (tmp_path / "dropfleet-supernode.service.log").read_text()[
                -3000:
            ]
            time.sleep(3)
        _, events = run_to_end(api, token, {**TWO_NODE_RUN, "num-server-rounds": 1}, timeout=600)
        assert events[-1] == {"status": "finished"}, events
        assert [e["replied"] for e in events if e.get("round") == 1] == [2]
        nodes = httpx.get(f"{api}/v1/nodes", timeout=30).json()
        node = next(n for n in nodes if n["profile"] == "pi-zero-512m")  # the board's own node config
        assert node["trainer"].startswith("streaming")  # the pi-zero's budget streams mlp-90k
        # Its footprint, as the board reported it: the ClientApp, and with SuperExec and SuperNode.
        supernode, superexec = (peak_rss(p.pid) for p in board)
        assert supernode and superexec and node["process_rss_bytes"]
        assert node["board_rss_bytes"] >= node["process_rss_bytes"] + superexec
        mib = {k: round(v / 2**20) for k, v in (
            ("supernode", supernode), ("superexec", superexec),
            ("clientapp", node["process_rss_bytes"]), ("board", node["board_rss_bytes"]),
        )}  # fmt: skip
        print(f"\nedge board peak RSS (MiB): {mib}")
        assert node["board_rss_bytes"] <= BOARD_RSS_BOUND, node
    finally:
        for p in board:
            os.killpg(p.pid, signal.SIGTERM)
            p.wait(30)
        run("fleet", "down", "--state-dir", str(state))
    print(f"\nedge install: {install_seconds:.0f} s ({sys.version_info[0]}.{sys.version_info[1]})")
