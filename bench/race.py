"""Accuracy per byte, federated: DropBack vs dense FedAvg vs top-k sparsified FedAvg.

    python bench/race.py [--quick] [--nodes 20] [--rounds 15]

The same fleet runs three times on Flower's Simulation Engine (`flwr run`):
20 devices of one profile (the pi4-4g budget, always available, so the top-k
baseline's clients never miss an update), Fashion-MNIST split with Dirichlet
alpha 0.5, the same rounds, seed and learning rate.

- dropback: the product, sparse models both ways.
- fedavg: Flower's dense FedAvg.
- topk-ef: FedAvg with top-k sparsified updates and error feedback both ways
  (STC-like; the same k per device up and the same global-k down as DropBack).

Per strategy it reports total bytes (up + down, model payload as metered by
the strategy) to reach the dense baseline's final accuracy minus 1 point, and
plots accuracy against cumulative bytes. The byte counts are cross-checked
against the network bytes the SuperLink reports for each run (`flwr ls
--format json`, which also counts message framing and metrics).
"""

import argparse
import json
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from dropfleet.server.simulation import run_simulation

STRATEGIES = ("dropback", "fedavg", "topk-ef")


def run(strategy: str, nodes: int, rounds: int, subset: int, work: Path) -> dict:
    results = work / f"{strategy}.jsonl"
    runs = work / f"{strategy}-runs.json"
    config = {
        "strategy": strategy,
        "num-server-rounds": rounds,
        "fleet-mix": "pi4-4g",
        "fraction-evaluate": 0.0,
        "min-available-nodes": nodes,
        "min-train-nodes": nodes,
        "results-file": str(results),
        "store-url": f"sqlite:///{work / 'store.db'}",
        "train-subset": subset,
    }
    code = run_simulation(nodes, config, work / f"flwr-{strategy}", runs_out=runs, timeout=3600)
    if code != 0:
        raise SystemExit(f"{strategy}: flwr run exited with {code}")
    rows = [json.loads(line) for line in results.read_text().splitlines() if line.strip()]
    total = 0
    curve = []
    for r in rows:
        total += r["bytes_up"] + r["bytes_down"]
        curve.append((total, r["accuracy"]))
    [flower_run] = json.loads(runs.read_text())["runs"]
    return {
        "strategy": strategy,
        "curve": curve,
        "final_accuracy": rows[-1]["accuracy"],
        "metered_bytes": total,
        "flower_network_bytes": flower_run["network-traffic"]["total-bytes"],
    }


def bytes_to_reach(curve: list[tuple[int, float]], target: float) -> int | None:
    return next((b for b, acc in curve if acc >= target), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="3 rounds on 200 examples per device")
    parser.add_argument("--nodes", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--out", type=Path, default=Path("results/bench-race.json"))
    args = parser.parse_args()
    rounds, subset = (3, 200) if args.quick else (args.rounds, 0)
    with tempfile.TemporaryDirectory(prefix="dropfleet-race-") as tmp:
        rows = {s: run(s, args.nodes, rounds, subset, Path(tmp)) for s in STRATEGIES}
    target = rows["fedavg"]["final_accuracy"] - 0.01
    for r in rows.values():
        r["bytes_to_target"] = bytes_to_reach(r["curve"], target)
    dense = rows["fedavg"]["bytes_to_target"]
    print(
        f"Accuracy per byte, {args.nodes} devices, {rounds} rounds, Dirichlet 0.5; "
        f"target = dense final accuracy - 1 pt = {100 * target:.2f}%"
    )
    print(
        f"{'strategy':<10} {'final acc':>9} {'bytes to target':>16} {'dense / this':>12} "
        f"{'metered bytes':>14} {'flower net bytes':>17} {'flower / metered':>16}"
    )
    for r in rows.values():
        reach = r["bytes_to_target"]
        reach_text = f"{reach:,}" if reach is not None else "never"
        ratio = f"{dense / reach:.1f}x" if reach and dense else "-"
        net = r["flower_network_bytes"]
        print(
            f"{r['strategy']:<10} {100 * r['final_accuracy']:>8.2f}% {reach_text:>16} {ratio:>12} "
            f"{r['metered_bytes']:>14,} {net:>17,} {net / r['metered_bytes']:>15.2f}x"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps({"nodes": args.nodes, "rounds": rounds, "target": target, "rows": rows}, indent=2)
    )
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows.values():
        xs, ys = zip(*r["curve"], strict=True)
        ax.plot([max(x, 1) / 1e6 for x in xs], [100 * y for y in ys], marker="o", ms=3, label=r["strategy"])
    ax.axhline(100 * target, color="grey", ls="--", lw=1, label="dense final - 1 pt")
    ax.set_xscale("log")
    ax.set_xlabel("cumulative bytes up + down (MB, log scale)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"Fashion-MNIST, {args.nodes} devices, Dirichlet 0.5")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(args.out.with_suffix(".png"), dpi=120)


if __name__ == "__main__":
    main()
