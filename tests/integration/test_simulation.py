"""`flwr run .` on Flower's Simulation Engine: a mixed fleet trains, only sparse bytes travel."""

from pathlib import Path

import pytest

from dropfleet.fleet.records import SPARSE_STYPE
from dropfleet.server.simulation import run_simulation
from tests.integration.procs import free_port_pair, processes_mentioning, read_jsonl

MIX = "mcu-256k,pi-zero-512m,pi4-4g,jetson-8g,dust-1k"


def _run(tmp_path: Path, nodes: int, **config) -> tuple[list[dict], list[dict]]:
    results, audit, home = tmp_path / "run.jsonl", tmp_path / "audit.jsonl", tmp_path / "flwr"
    run_config = {"results-file": str(results), "train-subset": 300, **config}
    rc = run_simulation(
        nodes,
        run_config,
        home,
        superlink_port=free_port_pair(),
        extra_env={"DROPFLEET_MESSAGE_AUDIT": str(audit)},
        timeout=420,
    )
    assert rc == 0
    assert processes_mentioning(str(home)) == []  # the managed SuperLink was stopped
    return read_jsonl(results), read_jsonl(audit)


def test_mixed_fleet_trains_with_sparse_messages_only(tmp_path):
    rounds, audit = _run(
        tmp_path, 10, **{"num-server-rounds": 2, "fleet-mix": MIX, "fraction-evaluate": 0.3, "global-k": 6000}
    )
    assert [r["round"] for r in rounds] == [0, 1, 2]
    assert rounds[0]["accuracy"] < 0.2 < 0.35 < rounds[2]["accuracy"]
    for r in rounds[1:]:
        # the two dust-1k nodes (partitions 4 and 9) refuse; the rest may drop out by chance
        assert r["failed"] >= 2 and r["replied"] + r["failed"] == r["sampled"] == 10
        assert sum("cannot hold the minimum model" in f for f in r["failures"]) == 2
        assert r["global_tracked"] == 6000 and r["rejected"] == 0
    # Every array in every message, both directions, is an encoded sparse model.
    arrays = [a for line in audit for a in line["arrays"]]
    assert arrays and all(a["stype"] == SPARSE_STYPE for a in arrays)
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
