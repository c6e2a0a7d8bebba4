"""`flwr run .` on Flower's Simulation Engine: a mixed fleet trains, only sparse bytes travel."""

import subprocess
import sys
from pathlib import Path

import pytest

from dropfleet.fleet.records import GLOBAL_DELTA_STYPE, SPARSE_STYPE
from dropfleet.server.reporting import read_results
from dropfleet.server.simulation import run_simulation
from tests.integration.procs import free_port_pair, processes_mentioning, read_jsonl

DROPFLEET = str(Path(sys.executable).parent / "dropfleet")
MIX = "mcu-512k,pi-zero-512m,pi4-4g,jetson-8g,dust-1k"


def _run(tmp_path: Path, nodes: int, **config) -> tuple[list[dict], list[dict]]:
    results, audit, home = tmp_path / "run.jsonl", tmp_path / "audit.jsonl", tmp_path / "flwr"
    run_config = {"results-file": str(results), "train-subset": 300, **config}
    sim = run_simulation(
        nodes,
        run_config,
        home,
        superlink_port=free_port_pair(),
        extra_env={"DROPFLEET_MESSAGE_AUDIT": str(audit)},
        timeout=420,
    )
    assert sim.code == 0 and sim.run_id
    assert processes_mentioning(str(home)) == []  # the managed SuperLink was stopped
    written = read_results(results)
    assert written["header"]["run_id"] == sim.run_id and written["header"]["versions"]["flwr"] == "1.42.0"
    assert written["end"]["status"] == "finished" and written["end"]["error"] is None
    return written["rounds"], read_jsonl(audit)


@pytest.mark.slow  # a whole simulation: `make test-slow` (CI runs it)
def test_mixed_fleet_trains_with_sparse_messages_only(tmp_path):
    """The accuracy-per-byte levers end to end (the paper's scheme runs in the process-fleet tests)."""
    rounds, audit = _run(
        tmp_path,
        10,
        **{
            "num-server-rounds": 2,
            "fleet-mix": MIX,
            "fraction-evaluate": 0.3,
            "global-k": 6000,
            "strategy": "dropback-momentum",
            "uplink-coding": "change",  # devices keep their feedback residual in Flower's node state
            "uplink-precision": "int8",
            "downlink-coding": "delta",  # ... and the global version they hold
        },
    )
    assert [r["round"] for r in rounds] == [0, 1, 2]
    assert rounds[0]["accuracy"] < 0.2 < 0.35 < rounds[2]["accuracy"]
    for r in rounds[1:]:
        # the two dust-1k nodes (partitions 4 and 9) refuse; the rest may drop out by chance
        assert r["failed"] >= 2 and r["replied"] + r["failed"] == r["sampled"] == 10
        assert sum("cannot hold a training step" in f for f in r["failures"]) == 2
        assert r["global_tracked"] == 6000 and r["rejected"] == 0
    # Every array in every message is an encoded sparse model up, a global delta down.
    for direction, stype in (("up", SPARSE_STYPE), ("down", GLOBAL_DELTA_STYPE)):
        arrays = [a for line in audit if line["direction"] == direction for a in line["arrays"]]
        assert arrays and all(a["stype"] == stype for a in arrays)
    # The byte counts reported per round are the exact payload sizes that travelled.
    up = sum(
        a["bytes"]
        for line in audit
        if line["direction"] == "up" and line["type"] == "train"
        for a in line["arrays"]
    )
    assert up == sum(r["bytes_up"] for r in rounds)
    down = sum(a["bytes"] for line in audit if line["direction"] == "down" for a in line["arrays"])
    assert down == sum(r["bytes_down"] for r in rounds)


@pytest.mark.slow
def test_dense_baseline_is_seen_as_dense(tmp_path):
    rounds, audit = _run(
        tmp_path, 4, **{"num-server-rounds": 1, "strategy": "fedavg", "fleet-mix": "jetson-8g"}
    )
    dense_floats = 4 * 89_610 * 4  # 4 clients, N float32 each, plus .npy headers of 6 arrays
    assert rounds[-1]["replied"] == 4 and dense_floats < rounds[-1]["bytes_up"] < dense_floats + 4 * 6 * 200
    assert {a["stype"] for line in audit for a in line["arrays"]} == {"numpy.ndarray"}


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["-c", "fleet-mix=pi4-4gb,jetson-8g"], "unknown device profile 'pi4-4gb'"),
        (["-c", "model-id=resnet-9000"], "'model-id'"),
        (["-c", "fleet-mix=dust-1k"], "no device in fleet-mix can train"),
        (["-c", "model-id=cnn-bn-prelu", "-c", "fleet-mix=pi4-4g"], "step of cnn-bn-prelu at batch 32"),
        (["--rounds", "-3"], "'num-server-rounds' has an invalid value: -3"),
        (["--strategy", "fedsgd"], "'strategy'"),
        (["-c", "no-such-key=1"], "unknown run-config key 'no-such-key'"),
        (["--nodes", "0"], "--nodes must be at least 1"),
        (["--nodes", "10000"], "the dirichlet partitioner needs 10 per device, so at most 6000 devices"),
        (["--nodes", "30001", "-c", "partitioner=iid"], "at most 30000 devices"),
        (
            ["--ray-address", "127.0.0.1:9", "--federation-config", "init-args-num-cpus=2"],
            "init-args-num-cpus cannot be used with --ray-address",
        ),
        (["--federation-config", "num-supernodes"], "--federation-config takes key=value"),
    ],
)
def test_simulate_refuses_bad_input_before_starting_anything(tmp_path, args, needle):
    home = tmp_path / "flwr"
    done = subprocess.run(
        [DROPFLEET, "simulate", "--flwr-home", str(home), *args], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2 and needle in done.stderr.strip().splitlines()[-1], done.stderr
    assert not home.exists() and processes_mentioning(str(home)) == []  # no SuperLink, no Ray


@pytest.mark.slow  # a whole simulation: `make test-slow` (CI runs it)
def test_simulate_exits_non_zero_with_the_reason_when_the_run_fails(tmp_path):
    """Every reply is over max-payload-bytes, so the run fails after one short round; flwr run exits 0."""
    results = tmp_path / "{run_id}.jsonl"
    done = subprocess.run(
        [
            DROPFLEET, "simulate", "--nodes", "2", "--rounds", "2", "--results", str(results),
            "--flwr-home", str(tmp_path / "flwr"),
            "-c", "fleet-mix=pi4-4g", "-c", "max-payload-bytes=1024", "-c", "train-subset=200",
            "-c", "max-short-rounds=1", "-c", "fraction-evaluate=0.0",
        ],
        capture_output=True, text=True, timeout=420,
    )  # fmt: skip
    last = done.stderr.strip().splitlines()[-1]
    assert done.returncode == 1 and "failed: RunFailedError" in last and "acceptable replies" in last, last
    [path] = list(tmp_path.glob("*.jsonl"))  # one file per run, named by its run id
    # Only dropfleet's own lines on screen; Flower's and Ray's beside the results, named in the error.
    log = path.with_suffix(".log")
    assert f"(Flower's and Ray's output: {log})" in last and "Starting Flower Simulation" in log.read_text()
    assert "initial model" in done.stdout and f"Flower's and Ray's log: {log}" in done.stdout
    assert "INFO" not in done.stdout + done.stderr.split("the last lines of")[0] and "USDT" not in done.stdout
    written = read_results(path)
    assert (
        path.stem == written["header"]["run_id"] and written["header"]["config"]["max-payload-bytes"] == 1024
    )
    assert [r["round"] for r in written["rounds"]] == [0] and written["end"]["status"] == "failed"
