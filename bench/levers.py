"""Accuracy per byte, the research sweep behind #11: which levers make federated DropBack win.

    python bench/levers.py [--quick] [--seeds 0,1,2] [--rounds 30] [--nodes 20] [--mix pi4-4g] [--jobs N]

Flower-free on purpose, so that variants x seeds x participation run in
parallel (one process per run): the devices run the product's own code
(`client/local.py`: data partition, budget -> trainer and k, DropBack or SGD), the server
the product's own merge and server optimizer (`common/merge.next_global`), and
bytes are the product's wire format (`common/codec.encode`) at fp16 — what the
`dropback` strategy meters. `bench/race.py` runs the same comparison on Flower
itself (fewer variants).

Fleet as in the race: `--nodes` devices of the pi4-4g profile (k = 10,917 of
N = 89,610), Dirichlet alpha 0.5, one local epoch, batch 32, lr 0.1; all devices
per round ("full") or half of them, drawn per round ("half"). Dense FedAvg sends
fp32 weights both ways; its fp16 row counts the same run at 2 bytes per weight
(values not re-quantized). Per seed and participation the target is that dense
run's final accuracy minus 1 point. `--mix` takes a mixed fleet as the race
does (profiles round robin; a device whose profile's availability is below 1
sits a round out by the ClientApp's own coin flip, after its instruction was
sent and counted).
"""

import argparse
import itertools
import json
import math
import os
import statistics
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path


def preset(changes: dict[str, object]) -> dict[str, object]:
    """`dropback-momentum` with `changes`: a key the run sets wins over the recipe (fleet/config.py)."""
    return {"strategy": "dropback-momentum", **changes}


# The accuracy levers of `dropback-momentum`, spelled out so that its byte levers can vary.
_LEVERS = {"aggregation": "tracked-mean", "server-momentum": 0.7, "learning-rate-schedule": "cosine"}
# dropback-momentum before the update memory (momentum 0.7, server step 1)
_BEFORE_MEMORY = {"server-momentum": 0.7, "server-learning-rate": 1.0, "update-memory-rounds": 0}
VARIANTS: dict[str, dict[str, object]] = {
    "dense fedavg": {"strategy": "fedavg"},
    "dropback (paper)": {},
    "tracked-mean": {"aggregation": "tracked-mean"},
    "tracked-mean + cosine lr": {"aggregation": "tracked-mean", "learning-rate-schedule": "cosine"},
    "tracked-mean + momentum 0.5": {"aggregation": "tracked-mean", "server-momentum": 0.5},
    "tracked-mean + momentum 0.5 + cosine lr": {
        "aggregation": "tracked-mean",
        "server-momentum": 0.5,
        "learning-rate-schedule": "cosine",
    },
    "momentum 0.7 + cosine lr, fp16 both ways": _LEVERS,
    # int4 change uplink; the global set whole at int8, or as changes since each device's version
    "momentum 0.7 + cosine lr, int4 change uplink, int8 down": preset(
        {**_BEFORE_MEMORY, "downlink-coding": "whole", "value-precision": "int8"}
    ),
    "momentum 0.7 + cosine lr, int4 change uplink, delta downlink int8": preset(
        {**_BEFORE_MEMORY, "value-precision": "int8"}
    ),
    # momentum 0.7 + cosine lr, int4 change uplink, delta downlink int4
    "dropback-momentum before the update memory": preset(_BEFORE_MEMORY),
    "dropback-momentum": {"strategy": "dropback-momentum"},  # and the update memory, momentum 0.4, step 1.5
}
# Further candidates, run by name (--variants): not part of the default sweep.
EXTRA: dict[str, dict[str, object]] = {
    "momentum 0.7 + cosine lr, int8 values": {**_LEVERS, "value-precision": "int8"},
    "momentum 0.7 + cosine lr, int4 values": {**_LEVERS, "value-precision": "int4"},
    "momentum 0.7 + cosine lr, int4 change uplink": {
        **_LEVERS,
        "uplink-coding": "change",
        "uplink-precision": "int4",
    },
    "momentum 0.5 + cosine lr + global-k 0.2": {
        "aggregation": "tracked-mean",
        "server-momentum": 0.5,
        "learning-rate-schedule": "cosine",
        "global-k": 0.2,
    },
    "momentum 0.5 + global-k 0.2": {"aggregation": "tracked-mean", "server-momentum": 0.5, "global-k": 0.2},
    # FedAdam / FedYogi on the global delta instead of momentum (eta = server-learning-rate).
    **{
        f"{opt} eta {eta:g} + cosine lr": {
            "aggregation": "tracked-mean",
            "server-optimizer": opt,
            "server-learning-rate": eta,
            "learning-rate-schedule": "cosine",
        }
        for opt in ("adam", "yogi")
        for eta in (0.1, 0.03, 0.01, 0.003)
    },
    "dropback-momentum, ternary change uplink": preset({**_BEFORE_MEMORY, "uplink-precision": "ternary"}),
    # The stabilizers tried on the preset before the update memory (momentum 0.7, server step 1).
    **{
        f"dropback-momentum, {name}": preset({**_BEFORE_MEMORY, **levers})
        for name, levers in (
            ("momentum 0.5", {"server-momentum": 0.5}),
            ("momentum 0.6", {"server-momentum": 0.6}),
            ("server lr 0.7", {"server-learning-rate": 0.7}),
            ("lr to 0.01", {"final-learning-rate": 0.01}),
            ("momentum 0.4", {"server-momentum": 0.4}),
            ("momentum 0.5, lr to 0.01", {"server-momentum": 0.5, "final-learning-rate": 0.01}),
            ("momentum 0.5, server lr 0.85", {"server-momentum": 0.5, "server-learning-rate": 0.85}),
            # MIFA: each device's latest update replayed in the rounds it sits out (common/update_memory)
            ("memory 30", {"update-memory-rounds": 30}),
            ("memory 3", {"update-memory-rounds": 3}),
            ("memory 30, momentum 0.5", {"update-memory-rounds": 30, "server-momentum": 0.5}),
            ("memory 30, momentum 0.3", {"update-memory-rounds": 30, "server-momentum": 0.3}),
        )
    },
    "momentum 0.5 + cosine lr to 0.05": {
        "aggregation": "tracked-mean",
        "server-momentum": 0.5,
        "learning-rate-schedule": "cosine",
        "final-learning-rate": 0.05,
    },
}
ALL = {**VARIANTS, **EXTRA}
PARTICIPATION = {"full": 1.0, "half": 0.5}


def run_one(
    variant: str,
    levers: dict[str, object],
    seed: int,
    participation: str,
    nodes: int,
    rounds: int,
    subset: int,
    mix: str = "pi4-4g",
) -> dict:
    """One federated run of `levers` (run-config keys) in this process; accuracy and bytes per round."""
    import numpy as np
    import torch

    from dropfleet.client.local import local_data, train_dense, train_sparse
    from dropfleet.client.round import is_available, uplink_payload
    from dropfleet.common.aggregate.merge import next_global
    from dropfleet.common.aggregate.update_memory import UpdateMemory
    from dropfleet.common.device.data import load_fashion_mnist
    from dropfleet.common.device.train import evaluate
    from dropfleet.common.model.sparse import SparseModel, num_weights
    from dropfleet.common.model.torch_model import materialize, seeded_model
    from dropfleet.common.wire.codec import HeldSet, decode, encode
    from dropfleet.common.wire.downlink import DownlinkPublisher, GlobalSet, apply_delta
    from dropfleet.common.wire.uplink import NO_RESIDUAL, Residual, resolve
    from dropfleet.fleet.config import RunConfig
    from dropfleet.fleet.profiles import profile_for_partition
    from dropfleet.server.strategies.dropback import server_optimizer

    torch.set_num_threads(1)
    raw = {"seed": seed, "num-server-rounds": rounds, "train-subset": subset, "fleet-mix": mix, **levers}
    config = RunConfig.from_mapping(raw)
    test = load_fashion_mnist("test")
    n = num_weights(config.model_id)
    dense = config.strategy == "fedavg"
    rng = np.random.default_rng([seed, 7])
    per_round = max(1, round(nodes * PARTICIPATION[participation]))
    global_sparse = SparseModel.empty(config.model_id, seed)
    state = seeded_model(config.model_id, seed).state_dict()
    opt = server_optimizer(config)
    memory = UpdateMemory(config.update_memory_rounds) if config.update_memory_rounds else None
    curve, up, down = [], 0, 0
    residuals: dict[int, Residual] = {}  # change-coded uplink: each device's unsent error
    delta_down = config.downlink_coding == "delta"
    if delta_down:  # the global sent in round r is version r; each device holds the last it trained from
        empty = GlobalSet.empty(config.model_id, seed, config.downlink_grid_exponent, version=1)
        publisher = DownlinkPublisher(empty, config.value_precision)
        held: dict[int, GlobalSet] = {}
    started = time.monotonic()
    for r in range(1, rounds + 1):
        sampled = sorted(rng.choice(nodes, per_round, replace=False).tolist())
        updates, dense_updates = [], []
        down_payload = len(encode(global_sparse, config.value_precision))
        for pid in sampled:
            profile = profile_for_partition(pid, config.profiles)
            if delta_down:
                mine = held.get(pid)
                message = publisher.message_for(mine.version if mine else None)
            down += 4 * n if dense else len(message) if delta_down else down_payload
            if not is_available(profile, config, r, pid):
                continue  # it refuses before reading the instruction: it holds the version it held
            train, _ = local_data(config, pid, nodes)
            if dense:
                new, _ = train_dense(state, train, config, r)
                dense_updates.append((new, len(train)))
                up += 4 * n
            else:
                if delta_down:
                    held[pid] = apply_delta(mine, message)  # digest-checked: the server's set exactly
                update = train_sparse(global_sparse, train, profile, config, r)
                payload, residuals[pid] = uplink_payload(
                    update.model, global_sparse, config, r, residuals.get(pid, NO_RESIDUAL)
                )
                reply = decode(payload, held=HeldSet(r, global_sparse))
                updates.append((pid, resolve(reply, global_sparse, r), float(update.num_examples)))
                up += len(payload)
        if not (dense_updates if dense else updates):  # nobody answered: the strategy keeps the global
            if delta_down:
                publisher.republish(r + 1)
        elif dense:
            total = sum(w for _, w in dense_updates)
            state = {k: sum(s[k] * (w / total) for s, w in dense_updates) for k in state}
        else:
            if memory is not None:
                merging = memory.augment(r, global_sparse, updates)
            else:
                merging = [(model, weight) for _, model, weight in updates]
            merged = next_global(
                global_sparse,
                merging,
                config.global_k_count,
                rule=config.aggregation,
                server_opt=opt if config.uses_server_optimizer else None,
            )
            if delta_down:
                global_sparse = publisher.publish(merged, r + 1).to_sparse()  # exactly what devices rebuild
            else:
                global_sparse = decode(encode(merged, config.value_precision))  # as devices receive it
        if dense:
            model = seeded_model(config.model_id, seed)
            model.load_state_dict(state)
        else:
            model = materialize(global_sparse)
        acc = evaluate(model, test).accuracy
        curve.append({"round": r, "accuracy": acc, "bytes_up": up, "bytes_down": down})
    return {
        "variant": variant,
        "seed": seed,
        "participation": participation,
        "curve": curve,
        "seconds": time.monotonic() - started,
        "tracked_state_bytes": 0 if dense else 8 * global_sparse.num_tracked,
        # the delta downlink's held set: positions and units, int32 each
        "held_global_bytes": 8 * global_sparse.num_tracked if not dense and delta_down else 0,
    }


def grid(spec: str) -> dict[str, dict[str, object]]:
    """`key=v1,v2;key2=...` -> one dropback-momentum variant per combination, named by its settings."""
    axes = []
    for part in filter(None, (p.strip() for p in spec.split(";"))):
        key, sep, values = part.partition("=")
        if not sep or not values:
            raise ValueError(f"grid axis {part!r} is not key=v1,v2")
        axes.append([(key.strip(), _value(v.strip())) for v in values.split(",")])
    if not axes:
        return {}
    return {
        "dropback-momentum, " + ", ".join(f"{k} {v}" for k, v in combo): preset(dict(combo))
        for combo in itertools.product(*axes)
    }


def _value(text: str) -> object:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _reach(
    curve: list[dict], target: float, byte_scale: float = 1.0
) -> tuple[float | None, int | None, float]:
    """(bytes to first reach target, that round, largest drop below the best after reaching it)."""
    for i, row in enumerate(curve):
        if row["accuracy"] >= target:
            after = [x["accuracy"] for x in curve[i:]]
            best, drop = after[0], 0.0
            for a in after:
                best = max(best, a)
                drop = max(drop, best - a)
            return (row["bytes_up"] + row["bytes_down"]) * byte_scale, row["round"], drop
    return None, None, 0.0


def _median_reach(hit: list[float], seeds: int) -> float | None:
    """The median over seeds of the bytes to reach the target, a seed that never does counting as infinite."""
    median = statistics.median(hit + [math.inf] * (seeds - len(hit)))
    return None if math.isinf(median) else median


def summarize(results: list[dict], variants: list[str]) -> list[dict]:
    rows = []
    for participation in PARTICIPATION:
        runs = [r for r in results if r["participation"] == participation]
        targets = {
            r["seed"]: r["curve"][-1]["accuracy"] - 0.01 for r in runs if r["variant"] == "dense fedavg"
        }
        names = [*variants, "dense fedavg (fp16)"]
        for name in names:
            variant, scale = ("dense fedavg", 0.5) if name.endswith("(fp16)") else (name, 1.0)
            mine = [r for r in runs if r["variant"] == variant]
            if not mine:
                continue
            reached = [_reach(r["curve"], targets[r["seed"]], scale) for r in mine if r["seed"] in targets]
            hit = [b for b, _, _ in reached if b is not None]
            median = _median_reach(hit, len(mine))
            rounds_n = len(mine[0]["curve"])
            last = mine[0]["curve"][-1]
            rows.append(
                {
                    "participation": participation,
                    "variant": name,
                    "seeds": len(mine),
                    "reached": len(hit),
                    "median_mb_to_target": median / 1e6 if median else None,
                    "median_round": statistics.median([r for _, r, _ in reached if r is not None])
                    if hit
                    else None,
                    "worst_drop_after": max((d for b, _, d in reached if b is not None), default=0.0),
                    "median_drop_after": statistics.median(
                        [d for b, _, d in reached if b is not None] or [0.0]
                    ),
                    "acc_at": {
                        str(k): statistics.median(r["curve"][k - 1]["accuracy"] for r in mine)
                        for k in (10, 20, 30)
                        if k <= rounds_n
                    },
                    "kb_up_per_round": last["bytes_up"] * scale / rounds_n / 1e3,
                    "kb_down_per_round": last["bytes_down"] * scale / rounds_n / 1e3,
                }
            )
    for row in rows:
        dense = next(
            (
                x["median_mb_to_target"]
                for x in rows
                if x["participation"] == row["participation"] and x["variant"] == "dense fedavg"
            ),
            None,
        )
        mb = row["median_mb_to_target"]
        row["dense_over_this"] = dense / mb if dense and mb else None
    return rows


def _print(rows: list[dict], nodes: int, mix: str) -> None:
    print(f"Accuracy per byte, {nodes} devices of {mix} (median over seeds; target: dense final - 1 pt)")
    head = f"  {'participation / variant':<48} {'reached':>7} {'MB to target':>12} {'round':>5} "
    head += (
        f"{'dense/this':>10} {'drop worst/med':>14} {'kB up/rd':>9} {'kB down/rd':>10}  accuracy at rounds"
    )
    print(head)
    for r in rows:
        mb = f"{r['median_mb_to_target']:.2f}" if r["median_mb_to_target"] else "never"
        rnd = f"{r['median_round']:.0f}" if r["median_round"] else "-"
        ratio = f"{r['dense_over_this']:.1f}x" if r["dense_over_this"] else "-"
        accs = " ".join(f"r{k} {100 * a:.2f}" for k, a in r["acc_at"].items())
        print(
            f"  {r['participation'] + ' / ' + r['variant']:<48} {r['reached']}/{r['seeds']:<5} {mb:>12} "
            f"{rnd:>5} {ratio:>10} {100 * r['worst_drop_after']:>6.2f}/{100 * r['median_drop_after']:<6.2f}p "
            f"{r['kb_up_per_round']:>9.1f} "
            f"{r['kb_down_per_round']:>10.1f}  {accs}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1 seed, 6 devices, 4 rounds, 300 examples each")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--nodes", type=int, default=20)
    parser.add_argument("--subset", type=int, default=0, help="cap each device's examples (0: all)")
    parser.add_argument(
        "--variants", default="", help="';'-separated subset of the variants (their names hold commas)"
    )
    parser.add_argument(
        "--grid",
        default="",
        help="'key=v1,v2;key=...': dropback-momentum with every combination of these run-config values",
    )
    parser.add_argument("--participation", default="full,half")
    parser.add_argument(
        "--mix",
        default="pi4-4g",
        help="device profiles, round robin (the default mixed fleet: mcu-512k,pi-zero-512m,pi4-4g,jetson-8g)",
    )
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out", type=Path, default=Path("results/bench-levers.json"))
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    nodes, rounds, subset = args.nodes, args.rounds, args.subset
    if args.quick:
        seeds, nodes, rounds, subset = [0], 6, 4, 300
    variants = [v.strip() for v in args.variants.split(";") if v.strip()]
    if unknown := set(variants) - set(ALL):
        parser.error(f"unknown variants {sorted(unknown)}; known: {list(ALL)}")
    chosen = {v: ALL[v] for v in variants}
    try:
        chosen.update(grid(args.grid))
    except ValueError as exc:
        parser.error(str(exc))
    chosen = chosen or dict(VARIANTS)
    chosen = {"dense fedavg": ALL["dense fedavg"], **chosen}  # the target comes from it
    jobs = [
        (v, chosen[v], s, p, nodes, rounds, subset, args.mix)
        for p in args.participation.split(",")
        for s in seeds
        for v in chosen
    ]
    started = time.monotonic()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    results: list[dict] = []
    with ProcessPoolExecutor(max_workers=min(args.jobs, len(jobs))) as pool:
        for done in as_completed([pool.submit(run_one, *job) for job in jobs]):
            results.append(done.result())
            # Written as runs finish, so a sweep cut short still leaves what it measured.
            args.out.write_text(json.dumps({"runs": results}, indent=1))
    rows = summarize(results, list(chosen))
    _print(rows, nodes, args.mix)
    print(f"  {len(jobs)} runs in {time.monotonic() - started:.0f} s on {args.jobs} processes")
    args.out.write_text(json.dumps({"rows": rows, "runs": results}, indent=1))
    if not math.isfinite(sum(r["curve"][-1]["accuracy"] for r in results)):
        raise SystemExit("a run ended with a non-finite accuracy")


if __name__ == "__main__":
    main()
