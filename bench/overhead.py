"""Optimizer overhead: DropBack step time / plain SGD step time, before and after freezing.

    python bench/overhead.py [--quick]

For each model, an SGD copy, a DropBack copy (k = N/20) and a naive DropBack
copy train in lockstep on the same Fashion-MNIST batches; each trio of steps
runs back to back and the median of the per-step ratios is reported, before
and after the tracked set is frozen (half-way; the naive one never freezes).
The naive DropBack is the paper's rule written the obvious way: an SGD step,
`torch.topk` of |w - w0| over all N weights, everything else reset to a dense
stored w0.
"""

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from dropfleet.common.device.data import load_fashion_mnist
from dropfleet.common.device.dropback import DropBack
from dropfleet.common.model.torch_model import seeded_model


class NaiveDropBack(torch.optim.Optimizer):
    """SGD, then keep the k weights farthest from w0 by `torch.topk` over all N, reset the rest."""

    def __init__(self, params: list[nn.Parameter], lr: float, k: int) -> None:
        super().__init__(params, {"lr": lr})
        self.k = k
        self.w0 = torch.cat([p.detach().reshape(-1).clone() for p in params])

    @torch.no_grad()
    def step(self) -> None:  # type: ignore[override]
        params = self.param_groups[0]["params"]
        for p in params:
            p.add_(p.grad, alpha=-self.param_groups[0]["lr"])
        w = torch.cat([p.reshape(-1) for p in params])
        keep = torch.zeros_like(w, dtype=torch.bool)
        keep[torch.topk((w - self.w0).abs(), self.k, sorted=False).indices] = True
        w = torch.where(keep, w, self.w0)
        start = 0
        for p in params:
            p.copy_(w[start : start + p.numel()].view_as(p))
            start += p.numel()


def measure(model_id: str, steps: int, batch: int, data) -> dict:
    sgd_model, db_model = seeded_model(model_id, 0), seeded_model(model_id, 0)
    naive_model = seeded_model(model_id, 0)
    n = sum(p.numel() for p in sgd_model.parameters())
    sgd = torch.optim.SGD(sgd_model.parameters(), lr=0.05)
    db = DropBack(db_model.parameters(), lr=0.05, k=n // 20, freeze_after=steps // 2)
    naive = NaiveDropBack(list(naive_model.parameters()), lr=0.05, k=n // 20)
    loss_fn = nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(0)
    ratios, naive_ratios = [], []
    for _ in range(steps):
        idx = torch.randint(0, len(data), (batch,), generator=gen)
        x, y = data.images[idx], data.labels[idx]
        times = []
        for model, opt in ((sgd_model, sgd), (db_model, db), (naive_model, naive)):
            t0 = time.perf_counter()
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            opt.step()
            times.append(time.perf_counter() - t0)
        ratios.append(times[1] / times[0])
        naive_ratios.append(times[2] / times[0])
    r = np.array(ratios[10:])  # skip warm-up
    half = steps // 2 - 10
    return {
        "model": model_id,
        "n": n,
        "k": n // 20,
        "before_freeze": float(np.median(r[:half])),
        "after_freeze": float(np.median(r[half:])),
        "naive": float(np.median(naive_ratios[10:])),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("results/bench-overhead.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = load_fashion_mnist("test")
    steps = 120 if args.quick else 1000
    rows = [measure(m, steps, 64, data) for m in ("mlp-90k", "cnn-bn-prelu")]
    print("DropBack / SGD step time (naive: SGD + torch.topk over N + reset, never frozen):")
    print(f"{'model':<14} {'N':>8} {'k':>7} {'before freeze':>14} {'after freeze':>13} {'naive':>8}")
    for r in rows:
        before, after, naive = r["before_freeze"], r["after_freeze"], r["naive"]
        print(f"{r['model']:<14} {r['n']:>8,} {r['k']:>7,} {before:>13.2f}x {after:>12.2f}x {naive:>7.2f}x")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"rows": rows}, indent=2))


if __name__ == "__main__":
    main()
