"""Server memory per node at fleet scale: the update memory at each device's own k, under its cap.

    python bench/server_state.py [--quick] [--nodes 10000] [--per-round 1000] [--cap-mib 256]

Flower-free: a fleet of the four default profiles, each device's k from its
memory budget (`plan_training`, as the devices compute it), reporting in
rounds of `--per-round` devices until every device has one kept update. Side
by side, in one run:
- bounded only by `max-k` (8 bytes x the largest k any profile allows x every
  node: what the memory could hold before it was charged per node),
- charged at each node's own k, uncapped (8 bytes x each node's k),
- the real `UpdateMemory` with the server-wide cap (`update-memory-bytes`):
  its bytes, how many updates it forgot, and the process's peak RSS.
"""

import argparse
import json
import resource
import time
from pathlib import Path

import numpy as np

from dropfleet.common.aggregate.update_memory import UpdateMemory
from dropfleet.common.device.budget import available_backend
from dropfleet.common.model.sparse import SparseModel, from_positions, num_weights
from dropfleet.fleet.config import RunConfig
from dropfleet.fleet.profiles import get_profile, plan_training

MIX = ("mcu-512k", "pi-zero-512m", "pi4-4g", "jetson-8g")


def update_of(template: SparseModel, k: int, rng: np.random.Generator) -> SparseModel:
    n = template.numel
    positions = np.sort(rng.choice(n, size=min(k, n), replace=False))
    return from_positions(template, positions, rng.standard_normal(positions.size).astype(np.float32))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1,000 nodes")
    parser.add_argument("--nodes", type=int, default=10_000)
    parser.add_argument("--per-round", type=int, default=1_000)
    parser.add_argument("--cap-mib", type=int, default=256)
    parser.add_argument("--out", type=Path, default=Path("results/bench-server-state.json"))
    args = parser.parse_args()
    nodes = 1_000 if args.quick else args.nodes
    config = RunConfig()
    model = config.model_id
    backend = available_backend()  # as the simulated devices plan
    ks = {
        p: plan_training(
            get_profile(p).state_budget_bytes, model, config.batch_size, config.min_k, backend=backend
        ).k
        for p in MIX
    }
    max_k = max(ks.values())
    fleet = [MIX[i % len(MIX)] for i in range(nodes)]
    rng = np.random.default_rng(0)
    template = SparseModel.empty(model, 0)
    memory = UpdateMemory(max_age=nodes // args.per_round + 1, max_bytes=args.cap_mib * 2**20)
    published = update_of(template, config.global_k_count, rng)
    started = time.monotonic()
    for r, first in enumerate(range(0, nodes, args.per_round), start=1):
        fresh = [
            (i, update_of(template, ks[fleet[i]], rng), 1.0)
            for i in range(first, min(nodes, first + args.per_round))
        ]
        memory.augment(r, published, fresh)
    seconds = time.monotonic() - started
    by_max_k = 8 * max_k * nodes
    own_k = 8 * sum(ks[p] for p in fleet)
    out = {
        "model": model,
        "N": num_weights(model),
        "nodes": nodes,
        "k_by_profile": ks,
        "bytes_if_charged_at_max_k": by_max_k,
        "bytes_at_own_k_uncapped": own_k,
        "cap_bytes": memory.max_bytes,
        "bytes_kept": memory.nbytes,
        "kept": len(memory),
        "forgotten": memory.evicted,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "seconds": round(seconds, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))
    print(f"{nodes:,} nodes of {', '.join(f'{p} (k={k:,})' for p, k in ks.items())}; model N = {out['N']:,}")
    print(f"  charged at max-k:      {by_max_k / 2**20:9.0f} MiB")
    print(f"  at each node's own k:  {own_k / 2**20:9.0f} MiB  ({by_max_k / own_k:.2f}x less)")
    kept = memory.nbytes
    print(
        f"  kept under the cap:    {kept / 2**20:9.0f} MiB  (cap {args.cap_mib} MiB; {memory.evicted:,} "
        f"forgotten, {len(memory):,} kept; {own_k / max(kept, 1):.2f}x less than uncapped)"
    )
    print(f"  peak RSS {out['peak_rss_mib']:.0f} MiB, {seconds:.1f} s")


if __name__ == "__main__":
    main()
