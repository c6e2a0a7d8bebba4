"""Accuracy per byte, federated: DropBack vs dense FedAvg vs top-k sparsified FedAvg.

    python bench/race.py [--quick] [--nodes 20] [--rounds 15] [--mix pi4-4g]

The same fleet runs once per strategy on Flower's Simulation Engine (`flwr
run`): by default 20 devices of one profile (the pi4-4g budget, always
available); `--mix` takes a mixed fleet whose devices miss rounds (the top-k
baseline then resyncs them). Fashion-MNIST split with Dirichlet alpha 0.5,
the same rounds, seed and learning rate.

- dropback: the product's paper scheme, sparse models both ways.
- dropback-momentum: with the accuracy-per-byte levers (README).
- fedavg: Flower's dense FedAvg.
- topk-ef: FedAvg with top-k sparsified updates and error feedback both ways
  (STC-like; the same k per device up and the same global-k down as DropBack).

Per strategy it reports total bytes (up + down, model payload as metered by
the strategy) to reach the dense baseline's final accuracy minus 1 point, and
plots accuracy against cumulative bytes. The byte counts are cross-checked
against the network bytes the SuperLink reports (`flwr ls --format json`,
which also counts message framing and metrics) on a short run of each
strategy on a real process fleet: the Simulation Engine counts no network
traffic.
"""

import argparse
import json
import socket
import tempfile
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from dropfleet.deploy.fleet import down as fleet_down
from dropfleet.deploy.fleet import up as fleet_up
from dropfleet.deploy.topology import FleetSpec
from dropfleet.fleet.flower_env import PROJECT_ROOT, flower_env
from dropfleet.server.flower_control import is_live, run_status, start_run
from dropfleet.server.reporting import read_results
from dropfleet.server.simulation import run_simulation
from dropfleet.server.store import Store

STRATEGIES = ("dropback", "dropback-momentum", "fedavg", "topk-ef")


def run(strategy: str, nodes: int, rounds: int, subset: int, work: Path, mix: str = "pi4-4g") -> dict:
    results = work / f"{strategy}.jsonl"
    config = {
        "strategy": strategy,
        "num-server-rounds": rounds,
        "fleet-mix": mix,
        "fraction-evaluate": 0.0,
        "min-available-nodes": nodes,
        "min-train-nodes": 1,
        "results-file": str(results),
        "store-url": f"sqlite:///{work / 'store.db'}",
        "train-subset": subset,
    }
    code = run_simulation(nodes, config, work / f"flwr-{strategy}", timeout=3600).code
    if code != 0:
        raise SystemExit(f"{strategy}: flwr run exited with {code}")
    rows = read_results(results)["rounds"]
    total = 0
    curve = []
    for r in rows:
        total += r["bytes_up"] + r["bytes_down"]
        curve.append((total, r["accuracy"]))
    return {
        "strategy": strategy,
        "curve": curve,
        "final_accuracy": rows[-1]["accuracy"],
        "metered_bytes": total,
    }


def crosscheck(work: Path, rounds: int) -> list[dict]:
    """Each strategy for a few rounds on a real process fleet (Deployment Engine, no TLS):
    the payload bytes the strategy metered against the network bytes the SuperLink counted."""
    spec = FleetSpec(
        nodes=3,
        profiles=("pi4-4g",),
        tls=False,
        superlink_port=free_port(),
        api_port=free_port(),
        node_port_base=free_port_range(3),
        state_dir=work / "fleet",
    )
    info = fleet_up(spec)
    env = flower_env(Path(info["flwr_home"]))
    store = Store(info["database_url"])
    out = []
    try:
        for strategy in STRATEGIES:
            config = {
                "strategy": strategy,
                "num-server-rounds": rounds,
                "fleet-mix": "pi4-4g",
                "fraction-evaluate": 0.0,
                "min-available-nodes": 3,
                "min-train-nodes": 3,
                "train-subset": 300,
            }
            run_id = start_run(str(PROJECT_ROOT), info["connection"], config, env)
            deadline = time.monotonic() + 600
            while is_live(status := run_status(run_id, info["connection"], env)):
                if time.monotonic() > deadline:
                    raise SystemExit(f"{strategy}: run {run_id} did not finish")
                time.sleep(2)
            metered = sum(r["bytes_up"] + r["bytes_down"] for r in store.rounds(run_id))
            network = status["network-traffic"]["total-bytes"]
            out.append({"strategy": strategy, "metered_bytes": metered, "flower_network_bytes": network})
    finally:
        fleet_down(spec.state_dir)
    return out


def free_port_range(n: int) -> int:
    while True:
        base = free_port()
        if all(_free(p) for p in range(base, base + n)):
            return base


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def plot(rows: dict[str, dict], target: float, nodes: int, path: Path) -> None:
    """Accuracy against cumulative bytes, log scale (round 0, before any byte, is left out)."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows.values():
        xs, ys = zip(*r["curve"][1:], strict=True)
        ax.plot([x / 1e6 for x in xs], [100 * y for y in ys], marker="o", ms=3, label=r["strategy"])
    ax.axhline(100 * target, color="grey", ls="--", lw=1, label="dense final - 1 pt")
    ax.set_xscale("log")
    ax.set_xlabel("cumulative bytes up + down (MB, log scale)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"Fashion-MNIST, {nodes} devices, Dirichlet 0.5, one point per round")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def bytes_to_reach(curve: list[tuple[int, float]], target: float) -> int | None:
    return next((b for b, acc in curve if acc >= target), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="3 rounds on 200 examples per device")
    parser.add_argument("--nodes", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument(
        "--mix",
        default="pi4-4g",
        help="device profiles, round robin (e.g. the default mixed fleet pi-zero-512m,pi4-4g,jetson-8g,"
        "whose devices miss rounds)",
    )
    parser.add_argument("--out", type=Path, default=Path("results/bench-race.json"))
    args = parser.parse_args()
    rounds, subset = (3, 200) if args.quick else (args.rounds, 0)
    with tempfile.TemporaryDirectory(prefix="dropfleet-race-") as tmp:
        rows = {s: run(s, args.nodes, rounds, subset, Path(tmp), args.mix) for s in STRATEGIES}
        network = crosscheck(Path(tmp), 2)
    target = rows["fedavg"]["final_accuracy"] - 0.01
    for r in rows.values():
        r["bytes_to_target"] = bytes_to_reach(r["curve"], target)
    dense = rows["fedavg"]["bytes_to_target"]
    print(
        f"Accuracy per byte, {args.nodes} devices, {rounds} rounds, Dirichlet 0.5; "
        f"target = dense final accuracy - 1 pt = {100 * target:.2f}%"
    )
    print(
        f"{'strategy':<18} {'final acc':>9} {'bytes to target':>16} {'dense / this':>12} {'total bytes':>14}"
    )
    for r in rows.values():
        reach = r["bytes_to_target"]
        reach_text = f"{reach:,}" if reach is not None else "never"
        ratio = f"{dense / reach:.1f}x" if reach and dense else "-"
        print(
            f"{r['strategy']:<18} {100 * r['final_accuracy']:>8.2f}% {reach_text:>16} {ratio:>12} "
            f"{r['metered_bytes']:>14,}"
        )
    print(
        "Cross-check on the Deployment Engine (3 devices, 2 rounds; the Simulation Engine counts no network):"
    )
    print(f"{'strategy':<18} {'metered bytes':>14} {'flower net bytes':>17} {'flower / metered':>16}")
    for c in network:
        ratio = c["flower_network_bytes"] / c["metered_bytes"]
        print(
            f"{c['strategy']:<18} {c['metered_bytes']:>14,} {c['flower_network_bytes']:>17,} {ratio:>15.2f}x"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    summary = {"nodes": args.nodes, "rounds": rounds, "target": target, "rows": rows, "crosscheck": network}
    args.out.write_text(json.dumps(summary, indent=2))
    plot(rows, target, args.nodes, args.out.with_suffix(".png"))


if __name__ == "__main__":
    main()
