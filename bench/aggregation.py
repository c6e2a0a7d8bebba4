"""Aggregation cost: merging M sparse updates of k values into a model of N weights.

    python bench/aggregation.py [--quick]

The merge works on the M*k received entries only, so its time should follow
M*k and stay flat in N. Reported: seconds per merge and seconds per million
received entries, side by side for growing N at fixed M*k.
"""

import argparse
import json
import time
from pathlib import Path

import numpy as np

from dropfleet.common.aggregate.merge import merge_sparse
from dropfleet.common.model.sparse import SparseModel, SparseTensor


def updates(n: int, m: int, k: int, rng: np.random.Generator) -> list[tuple[SparseModel, float]]:
    out = []
    for i in range(m):
        idx = np.sort(rng.choice(n, k, replace=False))
        vals = rng.standard_normal(k).astype(np.float32)
        out.append(
            (
                SparseModel(seed=0, model_id="synthetic", tensors=(SparseTensor("w", (n,), idx, vals),)),
                float(i + 1),
            )
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("results/bench-aggregation.json"))
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    grid = [
        (100_000, 10, 5_000),
        (1_000_000, 10, 5_000),
        (10_000_000, 10, 5_000),
        (1_000_000, 100, 5_000),
        (10_000_000, 100, 50_000),
    ]
    if args.quick:
        grid = grid[:2]
    rows = []
    print(f"{'N':>11} {'M':>4} {'k':>7} {'M*k':>10} {'seconds':>9} {'s per 1M entries':>17}")
    for n, m, k in grid:
        ups = updates(n, m, k, rng)
        best = min(_timed(ups, 2 * k) for _ in range(3))
        row = {"n": n, "m": m, "k": k, "entries": m * k, "seconds": best, "per_million": best / (m * k) * 1e6}
        rows.append(row)
        print(f"{n:>11,} {m:>4} {k:>7,} {m * k:>10,} {best:>9.4f} {row['per_million']:>17.4f}")
    base = rows[0]["seconds"]
    flat = [r for r in rows if r["entries"] == rows[0]["entries"]]
    print(
        "same M*k, growing N: time ratio "
        + ", ".join(f"N={r['n']:,}: {r['seconds'] / base:.2f}x" for r in flat)
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"rows": rows}, indent=2))


def _timed(ups: list[tuple[SparseModel, float]], big_k: int) -> float:
    t0 = time.perf_counter()
    merge_sparse(ups, big_k)
    return time.perf_counter() - t0


if __name__ == "__main__":
    main()
