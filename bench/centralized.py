"""Centralized benchmark: dense SGD vs DropBack on Fashion-MNIST with the 90k MLP.

All runs train in lockstep on the same batches (same seed, same epochs), and
every step of every run is timed back to back, so the step-time ratios are
measured side by side and machine noise hits all runs alike.

    python bench/centralized.py            # 10 epochs, the numbers in docs/benchmarks.md
    python bench/centralized.py --quick    # 1 epoch on 12k examples (CI smoke)
"""

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from dropfleet.common.device.data import load_fashion_mnist
from dropfleet.common.device.dropback import DropBack
from dropfleet.common.device.train import evaluate
from dropfleet.common.model.torch_model import seeded_model

MODEL_ID = "mlp-90k"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--freeze-epochs", type=float, default=2.0, help="epochs before the frozen variant stops reselecting"
    )
    parser.add_argument("--quick", action="store_true", help="1 epoch on 12k examples")
    parser.add_argument("--out", type=Path, default=Path("results/bench-centralized.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.quick:
        args.epochs, args.freeze_epochs = 1, 0.5

    train = load_fashion_mnist("train")
    if args.quick:
        train = train.subset(np.arange(12_000))
    test = load_fashion_mnist("test")
    n = sum(p.numel() for p in seeded_model(MODEL_ID, args.seed).parameters())
    steps_per_epoch = -(-len(train) // args.batch_size)

    runs: dict[str, tuple[nn.Module, torch.optim.Optimizer, int | None]] = {}
    model = seeded_model(MODEL_ID, args.seed)
    runs["dense SGD"] = (model, torch.optim.SGD(model.parameters(), lr=args.lr), None)
    for div in (5, 20, 45):
        model = seeded_model(MODEL_ID, args.seed)
        runs[f"DropBack k=N/{div}"] = (model, DropBack(model.parameters(), lr=args.lr, k=n // div), n // div)
    model = seeded_model(MODEL_ID, args.seed)
    freeze_steps = int(args.freeze_epochs * steps_per_epoch)
    runs[f"DropBack k=N/20, frozen after {args.freeze_epochs:g} ep"] = (
        model,
        DropBack(model.parameters(), lr=args.lr, k=n // 20, freeze_after=freeze_steps),
        n // 20,
    )
    # Issue #11's quality levers for DropBack itself, each against the same dense baseline.
    late = args.epochs / 2
    model = seeded_model(MODEL_ID, args.seed)
    runs[f"DropBack k=N/20, frozen after {late:g} ep"] = (
        model,
        DropBack(model.parameters(), lr=args.lr, k=n // 20, freeze_after=int(late * steps_per_epoch)),
        n // 20,
    )
    model = seeded_model(MODEL_ID, args.seed)
    runs["DropBack k=N/20, w0 decay 0.9/step"] = (
        model,
        DropBack(model.parameters(), lr=args.lr, k=n // 20, init_decay=0.9),
        n // 20,
    )
    for name in ("dense SGD, cosine lr", "DropBack k=N/20, cosine lr"):
        model = seeded_model(MODEL_ID, args.seed)
        opt = (
            torch.optim.SGD(model.parameters(), lr=args.lr)
            if name.startswith("dense")
            else DropBack(model.parameters(), lr=args.lr, k=n // 20)
        )
        runs[name] = (model, opt, None if name.startswith("dense") else n // 20)
    total_steps = args.epochs * steps_per_epoch

    loss_fn = nn.CrossEntropyLoss()
    step_times: dict[str, list[float]] = {name: [] for name in runs}
    gen = torch.Generator().manual_seed(args.seed)
    done = 0
    for _ in range(args.epochs):
        order = torch.randperm(len(train), generator=gen)
        for start in range(0, len(train), args.batch_size):
            idx = order[start : start + args.batch_size]
            x, y = train.images[idx], train.labels[idx]
            cosine = args.lr * 0.5 * (1 + math.cos(math.pi * done / total_steps))
            done += 1
            for name, (model, opt, _) in runs.items():
                if name.endswith("cosine lr"):
                    for group in opt.param_groups:
                        group["lr"] = cosine
                model.train()
                t0 = time.perf_counter()
                opt.zero_grad()
                loss_fn(model(x), y).backward()
                opt.step()
                step_times[name].append(time.perf_counter() - t0)

    sgd_times = np.array(step_times["dense SGD"])
    rows = []
    for name, (model, opt, k) in runs.items():
        result = evaluate(model, test)
        times = np.array(step_times[name])
        freeze_at = getattr(opt, "freeze_after", None) or 0
        frozen_part = 0 < freeze_at < len(times)
        row = {
            "run": name,
            "k": k or n,
            "test_accuracy": result.accuracy,
            "test_loss": result.loss,
            # median of per-step ratios: each pair of steps ran back to back on the same batch
            "step_ratio": float(np.median(times / sgd_times)),
        }
        if frozen_part:
            row["step_ratio_before_freeze"] = float(np.median((times / sgd_times)[:freeze_at]))
            row["step_ratio_after_freeze"] = float(np.median((times / sgd_times)[freeze_at:]))
        rows.append(row)

    dense_acc = rows[0]["test_accuracy"]
    print(
        f"Fashion-MNIST, {MODEL_ID} (N = {n:,}), lr {args.lr}, batch {args.batch_size}, "
        f"{args.epochs} epoch(s), seed {args.seed}, {len(train):,} training examples"
    )
    print(f"{'run':<40} {'k':>7} {'test acc':>9} {'vs dense':>9} {'step time / SGD':>16}")
    for r in rows:
        extra = ""
        if "step_ratio_after_freeze" in r:
            extra = (
                f"  (before freeze {r['step_ratio_before_freeze']:.2f}, "
                f"after {r['step_ratio_after_freeze']:.2f})"
            )
        print(
            f"{r['run']:<40} {r['k']:>7,} {100 * r['test_accuracy']:>8.2f}% "
            f"{100 * (r['test_accuracy'] - dense_acc):>+8.2f} {r['step_ratio']:>15.2f}x{extra}"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps({"config": {k: str(v) for k, v in vars(args).items()}, "n": n, "rows": rows}, indent=2)
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
