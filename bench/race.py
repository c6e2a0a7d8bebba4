"""Accuracy per byte on Flower: DropBack vs dense FedAvg vs top-k sparsified FedAvg, seeds x participation.

    python bench/race.py [--quick] [--seeds 0,1,2] [--participation full,half] [--rounds 30]
                         [--nodes 20] [--mix pi4-4g] [--variants "name;name"]

Every variant runs on Flower's Simulation Engine (`flwr run`) on the same
fleet: by default 20 devices of one profile (the pi4-4g budget, always
available; `--mix` takes a mixed fleet whose devices miss rounds), Fashion-
MNIST split with Dirichlet alpha 0.5, the same rounds, seed and learning rate.
"half" samples half the devices each round (`fraction-train = 0.5`), so a
device's next message spans the rounds it missed.

Variants (`VARIANTS`): dense FedAvg (Flower's, fp32; its bytes are also shown
counted at fp16), top-k FedAvg with error feedback both ways (fp16 values, and
STC's ternary values), DropBack as in the paper, and `dropback-momentum` (the
accuracy-per-byte levers, docs/benchmarks.md); `EXTRA` variants run when named.

Per participation and variant, over seeds: accuracy at rounds 10/20/30
(median), payload bytes up and down per round, bits per parameter per
device-round, the bytes to first reach that seed's dense final accuracy minus
1 point (median, and how many seeds reach it) — also counted with message
framing, by the ratio of the SuperLink's network bytes to the metered payload
bytes on a short run of each variant on a real process fleet (the Simulation
Engine counts no network traffic) — and the state a device keeps between
rounds and the peak of a training step. Plot: accuracy against cumulative
bytes, the median over seeds with the seeds' range as a band.
"""

import argparse
import json
import math
import socket
import statistics
import tempfile
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from dropfleet.common.device.budget import available_backend
from dropfleet.common.model.sparse import num_weights
from dropfleet.deploy.fleet import down as fleet_down
from dropfleet.deploy.fleet import up as fleet_up
from dropfleet.deploy.topology import FleetSpec
from dropfleet.fleet.config import RunConfig
from dropfleet.fleet.flower_env import PROJECT_ROOT, flower_env
from dropfleet.fleet.profiles import get_profile, plan_training
from dropfleet.server.flower_control import is_live, run_status, start_run
from dropfleet.server.reporting import read_results
from dropfleet.server.simulation import run_simulation
from dropfleet.server.store import Store

VARIANTS: dict[str, dict[str, object]] = {
    "dense fedavg": {"strategy": "fedavg"},
    "top-k EF": {"strategy": "topk-ef"},
    "top-k EF, ternary (STC)": {"strategy": "topk-ef", "value-precision": "ternary"},
    "dropback (paper)": {"strategy": "dropback"},
    "dropback-momentum": {"strategy": "dropback-momentum"},
}
# Run by name only (--variants): not part of the default race.
EXTRA: dict[str, dict[str, object]] = {
    # a calmer server step for a mixed fleet with partial participation (docs/benchmarks.md; levers.py --mix)
    "dropback-momentum, momentum 0.2, lr to 0.005": {
        "strategy": "dropback-momentum",
        "server-momentum": 0.2,
        "final-learning-rate": 0.005,
    },
}
ALL = {**VARIANTS, **EXTRA}
DENSE = "dense fedavg"
PARTICIPATION = {"full": 1.0, "half": 0.5}


def run(name: str, seed: int, participation: str, args: argparse.Namespace, work: Path) -> dict:
    """One Flower run of a variant; the accuracy and bytes of every round, and what its devices reported."""
    tag = (
        f"{name}-{seed}-{participation}".replace(" ", "_").replace(",", "").replace("(", "").replace(")", "")
    )
    results, store_url = work / f"{tag}.jsonl", f"sqlite:///{work / f'{tag}.db'}"
    config = {
        **ALL[name],
        "seed": seed,
        "num-server-rounds": args.rounds,
        "fleet-mix": args.mix,
        "fraction-train": PARTICIPATION[participation],
        "fraction-evaluate": 0.0,
        "min-available-nodes": args.nodes,
        "min-train-nodes": 1,
        "results-file": str(results),
        "store-url": store_url,
        "train-subset": args.subset,
    }
    started = time.monotonic()
    code = run_simulation(args.nodes, config, work / f"flwr-{tag}", timeout=3600).code
    if code != 0:
        raise SystemExit(f"{name}, seed {seed}, {participation}: flwr run exited with {code}")
    rows = read_results(results)["rounds"]
    nodes = Store(store_url).nodes()
    return {
        "variant": name,
        "seed": seed,
        "participation": participation,
        "seconds": time.monotonic() - started,
        "curve": [
            {
                "round": r["round"],
                "accuracy": r["accuracy"],
                "bytes_up": r["bytes_up"],
                "bytes_down": r["bytes_down"],
                "sampled": r["sampled"],
                "replied": r["replied"],
            }
            for r in rows
        ],
        "peak_bytes": [n["peak_bytes"] for n in nodes if n.get("peak_bytes")],
    }


def kept_between_rounds(name: str, mix: str) -> int:
    """Bytes a device of the fleet's first profile keeps from one round to the next, by construction."""
    config = RunConfig.from_mapping(ALL[name])
    n = num_weights(config.model_id)
    if config.strategy == "fedavg":
        return 0
    if config.strategy == "topk-ef":
        return 8 * n  # the dense model and the dense residual
    profile = get_profile(mix.split(",")[0])
    budget, backend = profile.state_budget_bytes, available_backend()  # as the fleet's devices plan
    k = plan_training(budget, config.model_id, config.batch_size, config.min_k, backend=backend).k
    kept = 8 * k if config.uplink_coding == "change" else 0  # the uplink residual at the tracked positions
    if config.downlink_coding == "delta":
        kept += 8 * config.global_k_count  # the held global set
    return kept


def crosscheck(variants: list[str], work: Path, rounds: int) -> dict[str, dict]:
    """Each variant for a few rounds on a real process fleet (Deployment Engine, no TLS):
    the payload bytes the strategy metered against the network bytes the SuperLink counted."""
    spec = FleetSpec(
        nodes=3,
        profiles=("pi4-4g",),
        tls=False,
        node_auth=False,
        dev=True,  # plain HTTP on loopback, unsigned runs: a measurement, not a published fleet
        superlink_port=free_port(),
        api_port=free_port(),
        node_port_base=free_port_range(3),
        state_dir=work / "fleet",
    )
    info = fleet_up(spec)
    env = flower_env(Path(info["flwr_home"]))
    store = Store(info["database_url"])
    out = {}
    try:
        for name in variants:
            config = {
                **ALL[name],
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
                    raise SystemExit(f"{name}: run {run_id} did not finish")
                time.sleep(2)
            metered = sum(r["bytes_up"] + r["bytes_down"] for r in store.rounds(run_id))
            network = status["network-traffic"]["total-bytes"]
            out[name] = {"metered_bytes": metered, "flower_network_bytes": network}
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


def _reach(curve: list[dict], target: float, scale: float) -> tuple[float | None, int | None, float]:
    """(bytes to first reach target, that round, largest drop below the best after reaching it)."""
    total = 0.0
    for i, row in enumerate(curve):
        total += (row["bytes_up"] + row["bytes_down"]) * scale
        if row["round"] > 0 and row["accuracy"] >= target:
            after = [x["accuracy"] for x in curve[i:]]
            best, drop = after[0], 0.0
            for a in after:
                best = max(best, a)
                drop = max(drop, best - a)
            return total, row["round"], drop
    return None, None, 0.0


def _median_reach(hit: list[float], seeds: int) -> float | None:
    """The median over seeds of the bytes to reach the target, a seed that never does counting as infinite."""
    median = statistics.median(hit + [math.inf] * (seeds - len(hit)))
    return None if math.isinf(median) else median


def summarize(runs: list[dict], framing: dict[str, float], n: int, mix: str) -> list[dict]:
    rows = []
    for participation in PARTICIPATION:
        mine_p = [r for r in runs if r["participation"] == participation]
        targets = {r["seed"]: r["curve"][-1]["accuracy"] - 0.01 for r in mine_p if r["variant"] == DENSE}
        for name in [*ALL, f"{DENSE} (fp16)"]:
            variant, scale = (DENSE, 0.5) if name.endswith("(fp16)") else (name, 1.0)
            mine = [r for r in mine_p if r["variant"] == variant and r["seed"] in targets]
            if not mine:
                continue
            reached = [_reach(r["curve"], targets[r["seed"]], scale) for r in mine]
            hit = [b for b, _, _ in reached if b is not None]
            trained = [row for r in mine for row in r["curve"] if row["round"] > 0]
            device_rounds_up = sum(row["replied"] for row in trained) or 1
            device_rounds_down = sum(row["sampled"] for row in trained) or 1
            up = sum(row["bytes_up"] for row in trained) * scale
            down = sum(row["bytes_down"] for row in trained) * scale
            rounds = len(trained) / len(mine)
            median_hit = _median_reach(hit, len(mine))
            peaks = [p for r in mine for p in r["peak_bytes"]]
            rows.append(
                {
                    "participation": participation,
                    "variant": name,
                    "seeds": len(mine),
                    "reached": len(hit),
                    "median_bytes_to_target": median_hit,
                    "median_bytes_to_target_framed": median_hit * framing.get(variant, 1.0)
                    if median_hit
                    else None,
                    "worst_drop_after": max((d for b, _, d in reached if b is not None), default=0.0),
                    "median_drop_after": statistics.median(
                        [d for b, _, d in reached if b is not None] or [0.0]
                    ),
                    "acc_at": {
                        str(k): statistics.median(r["curve"][k]["accuracy"] for r in mine)
                        for k in (10, 20, 30)
                        if k < len(mine[0]["curve"])
                    },
                    "kb_up_per_round": up / len(mine) / rounds / 1e3,
                    "kb_down_per_round": down / len(mine) / rounds / 1e3,
                    "bits_per_param_up": 8 * up / n / device_rounds_up,
                    "bits_per_param_down": 8 * down / n / device_rounds_down,
                    "kept_between_rounds": kept_between_rounds(variant, mix),
                    "median_step_peak": statistics.median(peaks) if peaks else None,
                }
            )
    for row in rows:
        dense = next(
            (
                x["median_bytes_to_target"]
                for x in rows
                if x["participation"] == row["participation"] and x["variant"] == DENSE
            ),
            None,
        )
        mine = row["median_bytes_to_target"]
        row["dense_over_this"] = dense / mine if dense and mine else None
    return rows


def plot(runs: list[dict], path: Path, nodes: int) -> None:
    """Accuracy against cumulative bytes per participation: median over seeds, the seeds' range as a band."""
    parts = [p for p in PARTICIPATION if any(r["participation"] == p for r in runs)]
    fig, axes = plt.subplots(1, len(parts), figsize=(7 * len(parts), 4.5), squeeze=False)
    for ax, participation in zip(axes[0], parts, strict=True):
        for name in ALL:
            mine = [r for r in runs if r["participation"] == participation and r["variant"] == name]
            if not mine:
                continue
            rounds = min(len(r["curve"]) for r in mine)
            cum = []
            for r in mine:
                total, xs = 0, []
                for row in r["curve"][:rounds]:
                    total += row["bytes_up"] + row["bytes_down"]
                    xs.append(total)
                cum.append(xs)
            x = [statistics.median(c[i] for c in cum) / 1e6 for i in range(1, rounds)]
            accs = [[100 * r["curve"][i]["accuracy"] for r in mine] for i in range(1, rounds)]
            (line,) = ax.plot(x, [statistics.median(a) for a in accs], marker="o", ms=2, label=name)
            ax.fill_between(
                x, [min(a) for a in accs], [max(a) for a in accs], color=line.get_color(), alpha=0.2
            )
        ax.set_xscale("log")
        ax.set_xlabel("cumulative bytes up + down (MB, log scale)")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"{participation} participation: {nodes} devices, Dirichlet 0.5")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _print(rows: list[dict], framing: dict[str, float]) -> None:
    print("Accuracy per byte on Flower (median over seeds; target: that seed's dense final - 1 pt)")
    print(
        f"  {'participation / variant':<42} {'reached':>7} {'MB to target':>12} {'framed':>8} "
        f"{'dense/this':>10} {'drop worst/med':>14} {'kB up/rd':>9} {'kB dn/rd':>9} {'bits/param up/dn':>16} "
        f"{'kept B':>9} {'step peak B':>11}  accuracy at rounds"
    )
    for r in rows:
        mb = f"{r['median_bytes_to_target'] / 1e6:.2f}" if r["median_bytes_to_target"] else "never"
        framed = (
            f"{r['median_bytes_to_target_framed'] / 1e6:.2f}" if r["median_bytes_to_target_framed"] else "-"
        )
        ratio = f"{r['dense_over_this']:.1f}x" if r["dense_over_this"] else "-"
        peak = f"{r['median_step_peak']:,.0f}" if r["median_step_peak"] else "-"
        accs = " ".join(f"r{k} {100 * a:.2f}" for k, a in r["acc_at"].items())
        print(
            f"  {r['participation'] + ' / ' + r['variant']:<42} {r['reached']}/{r['seeds']:<5} {mb:>12} "
            f"{framed:>8} {ratio:>10} {100 * r['worst_drop_after']:>6.2f}/"
            f"{100 * r['median_drop_after']:<6.2f}p {r['kb_up_per_round']:>9.1f} "
            f"{r['kb_down_per_round']:>9.1f} {r['bits_per_param_up']:>7.3f}/{r['bits_per_param_down']:<8.3f} "
            f"{r['kept_between_rounds']:>9,} {peak:>11}  {accs}"
        )
    print("  framing (SuperLink network bytes / metered payload, 3-device process fleet, 2 rounds):")
    print("  " + ", ".join(f"{name} {ratio:.2f}x" for name, ratio in framing.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument(
        "--quick", action="store_true", help="1 seed, full participation, 3 rounds, 200 examples"
    )
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--participation", default="full,half")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--nodes", type=int, default=20)
    parser.add_argument("--subset", type=int, default=0, help="cap each device's examples (0: all)")
    parser.add_argument(
        "--mix",
        default="pi4-4g",
        help="device profiles, round robin (e.g. the default mixed fleet pi-zero-512m,pi4-4g,jetson-8g,"
        "whose devices miss rounds)",
    )
    parser.add_argument("--variants", default="", help="';'-separated subset (dense fedavg always runs)")
    parser.add_argument("--out", type=Path, default=Path("results/bench-race.json"))
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    participations = args.participation.split(",")
    if args.quick:
        seeds, participations, args.rounds, args.subset = [0], ["full"], 3, 200
    variants = [v.strip() for v in args.variants.split(";") if v.strip()] or list(VARIANTS)
    if unknown := set(variants) - set(ALL):
        parser.error(f"unknown variants {sorted(unknown)}; known: {list(ALL)}")
    if DENSE not in variants:
        variants.insert(0, DENSE)
    if unknown := set(participations) - set(PARTICIPATION):
        parser.error(f"unknown participation {sorted(unknown)}; known: {list(PARTICIPATION)}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    runs: list[dict] = []
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="dropfleet-race-") as tmp:
        for participation in participations:
            for seed in seeds:
                for name in variants:
                    runs.append(run(name, seed, participation, args, Path(tmp)))
                    # Written as runs finish, so a race cut short still leaves what it measured.
                    args.out.write_text(json.dumps({"runs": runs}, indent=1))
        network = crosscheck(variants, Path(tmp), 2)
    framing = {name: c["flower_network_bytes"] / c["metered_bytes"] for name, c in network.items()}
    n = num_weights(RunConfig().model_id)
    rows = summarize(runs, framing, n, args.mix)
    _print(rows, framing)
    print(f"  {len(runs)} runs in {time.monotonic() - started:.0f} s")
    summary = {"nodes": args.nodes, "rounds": args.rounds, "rows": rows, "crosscheck": network, "runs": runs}
    args.out.write_text(json.dumps(summary, indent=1))
    plot(runs, args.out.with_suffix(".png"), args.nodes)


if __name__ == "__main__":
    main()
