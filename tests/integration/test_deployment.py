"""The same app on Flower's Deployment Engine: a real SuperLink and SuperNodes on 127.0.0.1."""

import subprocess

import pytest

from dropfleet.fleet.flower_env import PROJECT_ROOT, flower_env
from dropfleet.server.reporting import read_results
from tests.integration.procs import (
    BIN,
    free_port,
    processes_mentioning,
    start,
    stop,
    wait_healthy,
)

PROFILES = ["mcu-512k", "pi-zero-512m", "pi4-4g"]


@pytest.mark.slow  # the process-fleet tests (tests/deploy) cover the Deployment Engine in `make test`
def test_superlink_and_supernodes_train(tmp_path):
    home = tmp_path / "flwr"
    home.mkdir()
    port = free_port()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "deploy"\n\n[superlink.deploy]\naddress = "127.0.0.1:{port}"\n'
        "insecure = true\n"
    )
    env = flower_env(home)
    results = tmp_path / "run.jsonl"
    procs = [
        start(
            [
                str(BIN / "flower-superlink"),
                "--insecure",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--database",
                str(tmp_path / "state.db"),
                "--disable-runtime-dependency-installation",
            ],
            tmp_path / "superlink.log",
            env,
        )
    ]
    try:
        wait_healthy(f"http://127.0.0.1:{port}/health")
        for i, profile in enumerate(PROFILES):
            node_config = f'partition-id={i} num-partitions={len(PROFILES)} profile="{profile}"'
            procs.append(
                start(
                    [
                        str(BIN / "flower-supernode"),
                        "--insecure",
                        "--superlink",
                        f"127.0.0.1:{port}",
                        "--host",
                        "127.0.0.1",
                        "--port",
                        str(free_port()),
                        "--node-config",
                        node_config,
                    ],
                    tmp_path / f"supernode-{i}.log",
                    env,
                )
            )
        run_config = (
            f"num-server-rounds=2 train-subset=600 fraction-evaluate=0.34 min-available-nodes=3 "
            f'min-train-nodes=3 results-file="{results}"'
        )
        done = subprocess.run(
            [str(BIN / "flwr"), "run", str(PROJECT_ROOT), "deploy", "--stream", "--run-config", run_config],
            env=env,
            cwd=tmp_path,
            timeout=480,
            capture_output=True,
            text=True,
        )
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    finally:
        stop(procs)
    rounds = read_results(results)["rounds"]
    assert [r["round"] for r in rounds] == [0, 1, 2]
    assert rounds[2]["accuracy"] > 0.25 > 0.15 > rounds[0]["accuracy"]
    assert all(r["sampled"] == 3 and r["bytes_up"] > 0 for r in rounds[1:])
    assert processes_mentioning(str(tmp_path)) == []
