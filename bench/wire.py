"""Wire efficiency: encoded position bytes against the information floor log2(C(N, k)).

    python bench/wire.py [--quick]

Positions are the Golomb-Rice coded gaps of k random tracked indices among N
(random positions are the worst case for a gap code); the ratio is measured
on the bytes the codec actually emits.
"""

import argparse
import json
from pathlib import Path

import numpy as np

from dropfleet.common.model.sparse import SparseModel, SparseTensor
from dropfleet.common.wire.codec import encode, encode_positions, position_floor_bits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("results/bench-wire.json"))
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    sizes = [89_610, 266_610] + ([] if args.quick else [1_000_000, 10_000_000])
    rows = []
    print(
        f"{'N':>11} {'k':>9} {'floor B':>10} {'positions B':>12} {'ratio':>7} "
        f"{'fp32 B':>10} {'fp16 B':>10} {'int8 B':>10} {'dense/fp16':>11}"
    )
    for n in sizes:
        for div in (5, 20, 45, 200):
            k = n // div
            idx = np.sort(rng.choice(n, k, replace=False))
            _, quot, rem = encode_positions(idx)
            floor = position_floor_bits(n, k) / 8
            pos = len(quot) + len(rem)
            row = {"n": n, "k": k, "floor_bytes": floor, "position_bytes": pos, "ratio": pos / floor}
            if n == 89_610:  # whole messages for the paper's MLP
                vals = (rng.standard_normal(k) * 0.01).astype(np.float32)
                cut = [0, 78_400, 78_500, 88_500, 88_600, 89_600, 89_610]
                shapes = [(100, 784), (100,), (100, 100), (100,), (10, 100), (10,)]
                names = ["1.weight", "1.bias", "3.weight", "3.bias", "5.weight", "5.bias"]
                tensors = []
                for i, (name, shape) in enumerate(zip(names, shapes, strict=True)):
                    sel = (idx >= cut[i]) & (idx < cut[i + 1])
                    tensors.append(SparseTensor(name, shape, idx[sel] - cut[i], vals[sel]))
                model = SparseModel(seed=0, model_id="mlp-90k", tensors=tuple(tensors))
                for p in ("fp32", "fp16", "int8"):
                    row[f"{p}_bytes"] = len(encode(model, p))
            rows.append(row)
            extra = (
                f"{row['fp32_bytes']:>10,} {row['fp16_bytes']:>10,} {row['int8_bytes']:>10,} "
                f"{4 * n / row['fp16_bytes']:>10.1f}x"
                if "fp32_bytes" in row
                else ""
            )
            print(f"{n:>11,} {k:>9,} {floor:>10,.0f} {pos:>12,} {pos / floor:>7.4f} {extra}")
    worst = max(r["ratio"] for r in rows)
    print(f"worst positions / floor: {worst:.4f} (target <= 1.1)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"rows": rows, "worst_ratio": worst}, indent=2))


if __name__ == "__main__":
    main()
