"""Device memory: what a client keeps across steps, and its peak during one step.

    python bench/memory.py [--quick]

Four ways to train the same model at k = N/20 on the same Fashion-MNIST
batches: plain SGD, DropBack on a dense model, streaming DropBack one layer at
a time, and streaming DropBack in blocks of at most 2,048 weights.

- weights: bytes of weights and weight state held between steps (dense
  parameters; tracked indices, values and initial values).
- held: every tensor and array the model and optimizer hold between steps
  (adds gradients and scratch buffers), found by walking the objects.
- peak: what is held when a step starts (after zero_grad) plus the memory
  allocated during one forward/backward/step: the peak of the torch
  profiler's memory timeline (every tensor allocation and free, in order)
  plus the Python/numpy peak from tracemalloc (an upper bound: the two peaks
  need not coincide).
- time: step time relative to SGD (streaming regenerates every weight twice).
Ratios are SGD's figure over the mode's figure, measured in this run.
"""

import argparse
import json
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile
from torch.profiler._memory_profiler import Action

from dropfleet.common.data import load_fashion_mnist
from dropfleet.common.dropback import DropBack
from dropfleet.common.layer_init import seeded_model
from dropfleet.common.streaming import StreamingDropBack
from dropfleet.common.train import evaluate

BLOCK = 2048


def _buffers(obj: object) -> list[object]:
    """Tensors and arrays an object holds directly or in lists/tuples/dicts."""
    found: list[object] = []
    stack = list(vars(obj).values()) if hasattr(obj, "__dict__") else []
    while stack:
        v = stack.pop()
        if isinstance(v, (torch.Tensor, np.ndarray)):
            found.append(v)
        elif isinstance(v, (list, tuple)):
            stack.extend(v)
        elif isinstance(v, dict):
            stack.extend(v.values())
    return found


def _bytes(buffers: list[object]) -> int:
    """Bytes of distinct storages (views and numpy aliases of a tensor count once)."""
    seen: dict[int, int] = {}
    for b in buffers:
        if isinstance(b, torch.Tensor):
            st = b.untyped_storage()
            seen[st.data_ptr()] = max(seen.get(st.data_ptr(), 0), st.nbytes())
        else:
            base = b
            while isinstance(base.base, np.ndarray):
                base = base.base
            ptr = base.__array_interface__["data"][0]
            seen[ptr] = max(seen.get(ptr, 0), base.nbytes)
    return sum(seen.values())


def step_peak(step: Callable[[], None]) -> tuple[int, int]:
    """(torch allocator peak, Python/numpy peak) of one step, above what existed before it."""
    with profile(
        activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True
    ) as prof:
        tracemalloc.start()
        step()
        _, py_peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    # The profiler's memory timeline: every tensor allocation and free, in time order.
    live = peak = 0
    for _, action, _, size in prof._memory_profile().timeline:
        if action == Action.CREATE:
            live += size
        elif action == Action.DESTROY:
            live -= size
        peak = max(peak, live)
    return peak, py_peak


class Mode:
    def __init__(self, name: str, model_id: str, k: int) -> None:
        self.name = name
        if name == "sgd":
            self.model = seeded_model(model_id, 0)
            self.opt = torch.optim.SGD(self.model.parameters(), lr=0.1)
        elif name == "dropback":
            self.model = seeded_model(model_id, 0)
            self.opt = DropBack(self.model.parameters(), lr=0.1, k=k)
        else:
            block = BLOCK if name == "streaming-blocks" else None
            self.model = self.opt = StreamingDropBack(model_id, 0, k, 0.1, block_weights=block)

    def weights(self) -> int:
        """Weights and the optimizer's weight state (what its `state_bytes` accounts for)."""
        dense = _bytes(list(self.model.parameters())) if isinstance(self.model, nn.Module) else 0
        return dense + (self.opt.state_bytes() if self.name != "sgd" else 0)

    def held(self) -> int:
        own = [] if self.model is self.opt else _buffers(self.opt)
        if isinstance(self.model, nn.Module):
            own += list(self.model.parameters()) + [
                p.grad for p in self.model.parameters() if p.grad is not None
            ]
        return _bytes(own + _buffers(self.model))

    def step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        nn.functional.cross_entropy(self.model(x), y).backward()
        self.opt.step()


def measure(model_id: str, steps: int, data, test) -> list[dict]:
    n = sum(p.numel() for p in seeded_model(model_id, 0).parameters())
    k = n // 20
    modes = [Mode(m, model_id, k) for m in ("sgd", "dropback", "streaming", "streaming-blocks")]
    gen = torch.Generator().manual_seed(0)
    seconds = dict.fromkeys((m.name for m in modes), 0.0)
    for _ in range(steps):  # lockstep on the same batches
        idx = torch.randint(0, len(data), (32,), generator=gen)
        for m in modes:
            t0 = time.perf_counter()
            m.opt.zero_grad()
            m.step(data.images[idx], data.labels[idx])
            seconds[m.name] += time.perf_counter() - t0
    rows = []
    x, y = data.images[:32], data.labels[:32]
    for m in modes:
        held = m.held()  # between steps: after step(), before the next zero_grad()
        m.opt.zero_grad()
        at_start = m.held()  # SGD's gradients are freed here and allocated again in backward
        torch_peak, py_peak = step_peak(lambda m=m: m.step(x, y))
        rows.append(
            {
                "model": model_id,
                "mode": m.name,
                "n": n,
                "k": k,
                "weights_bytes": m.weights(),
                "held_bytes": held,
                "step_peak_bytes": torch_peak + py_peak,
                "peak_bytes": at_start + torch_peak + py_peak,
                "accuracy": evaluate(m.model, test).accuracy,
                "time_vs_sgd": seconds[m.name] / seconds["sgd"],
            }
        )
    sgd = rows[0]
    for r in rows:
        r["weights_ratio"] = sgd["weights_bytes"] / r["weights_bytes"]
        r["held_ratio"] = sgd["held_bytes"] / r["held_bytes"]
        r["peak_ratio"] = sgd["peak_bytes"] / r["peak_bytes"]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("results/bench-memory.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    data, test = load_fashion_mnist("train"), load_fashion_mnist("test")
    if args.quick:
        test = test.subset(np.arange(2000))
    steps = 40 if args.quick else 400
    rows = [r for m in ("mlp-90k", "lenet-300-100") for r in measure(m, steps, data, test)]
    print(f"Device memory at k = N/20 after {steps} steps (ratios: SGD / mode, this run):")
    print(
        f"{'model':<14} {'mode':<17} {'weights B':>10} {'ratio':>6} {'held B':>10} {'ratio':>6} "
        f"{'peak B':>10} {'ratio':>6} {'acc':>7} {'time':>6}"
    )
    for r in rows:
        print(
            f"{r['model']:<14} {r['mode']:<17} {r['weights_bytes']:>10,} {r['weights_ratio']:>5.1f}x "
            f"{r['held_bytes']:>10,} {r['held_ratio']:>5.1f}x "
            f"{r['peak_bytes']:>10,} {r['peak_ratio']:>5.1f}x "
            f"{100 * r['accuracy']:>6.2f}% {r['time_vs_sgd']:>5.1f}x"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"steps": steps, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
