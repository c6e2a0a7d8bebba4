"""What one training step costs in memory: each trainer's stated footprint, and the measured peak.

A device's memory budget has to cover the peak of a step, not only what it
keeps between steps: gradients, scratch buffers, the selection's candidates
and the activations of one batch all live at once inside a step. Each trainer
states its peak as `fixed + bytes_per_tracked * k` (`DropBack.footprint`,
`StreamingDropBack.footprint`); the device picks its mode and k from that
(`client/profiles.plan_training`), and tests hold every stated footprint to
the peak `measure_step_peak` finds in real steps.
"""

import os
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import Literal, get_args

import numpy as np
import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from dropfleet.common.model.torch_model import build_model

# How a device trains, fastest first: DropBack on dense weights, streaming one layer at
# a time, streaming in row blocks (client/profiles.plan_training chooses by budget).
TrainingMode = Literal["dense", "streaming", "streaming-blocks"]
TRAINERS: tuple[str, ...] = get_args(TrainingMode)

# Activations of one step, per byte of module outputs in a forward pass: saved
# for backward, their gradients, and pooling indices (measured: 1.25x on the CNN).
ACTIVATION_FACTOR = 1.5
IMAGE_SHAPE = (1, 28, 28)
# Kineto, the profiler's native layer, writes two "USDT ... profiler_start/stop" lines to stderr
# per session unless its log level is above all of its levels (6: USDT is 5, ERROR 4). It reads
# the level once, when the process first profiles; a user's own setting is kept.
KINETO_QUIET = ("KINETO_LOG_LEVEL", "6")


@dataclass(frozen=True)
class Footprint:
    """Peak bytes of a training step as a function of the tracked budget k."""

    fixed_bytes: int
    bytes_per_tracked: int

    def bytes(self, k: int) -> int:
        return self.fixed_bytes + self.bytes_per_tracked * k

    def max_k(self, budget_bytes: int) -> int:
        """The largest k whose step fits `budget_bytes` (0 when not even the fixed part fits)."""
        return max(0, (budget_bytes - self.fixed_bytes) // self.bytes_per_tracked)


@cache
def activation_bytes(model_id: str, batch_size: int) -> int:
    """A bound on the activation memory of one training step at `batch_size`.

    From the output sizes of every leaf module in one forward pass on the meta
    device (no memory, no compute).
    """
    model = build_model(model_id).to("meta")
    total = 0

    def count(_module: nn.Module, _inputs: object, output: torch.Tensor) -> None:
        nonlocal total
        total += output.numel() * output.element_size()

    # A flatten's output is a view of its input: no memory of its own.
    leaves = [m for m in model.modules() if not list(m.children()) and not isinstance(m, nn.Flatten)]
    hooks = [m.register_forward_hook(count) for m in leaves]
    try:
        model(torch.empty(batch_size, *IMAGE_SHAPE, device="meta"))
    finally:
        for h in hooks:
            h.remove()
    return int(ACTIVATION_FACTOR * total)


def held_bytes(*objects: object) -> int:
    """Bytes of the distinct tensor and array storages that `objects` hold (directly or in containers).

    Walks attributes, lists, tuples and dicts; an `nn.Module` contributes its
    parameters, their gradients and its buffers. Views count once.
    """
    found: list[object] = []
    seen_objects: set[int] = set()
    stack = [(v, True) for v in objects]
    while stack:
        v, top = stack.pop()
        if id(v) in seen_objects:
            continue
        seen_objects.add(id(v))
        if isinstance(v, (torch.Tensor, np.ndarray)):
            found.append(v)
            if isinstance(v, torch.Tensor) and v.grad is not None:
                found.append(v.grad)
        elif isinstance(v, nn.Module):
            stack.extend((t, False) for t in (*v.parameters(), *v.buffers()))
        elif isinstance(v, (list, tuple)):
            stack.extend((x, False) for x in v)
        elif isinstance(v, dict):
            stack.extend((x, False) for x in v.values())
        elif (top or not callable(v)) and isinstance(getattr(v, "__dict__", None), dict):
            # Plain objects (and the trainers passed in): functions and kernels hold no state.
            stack.extend((x, False) for x in vars(v).values())
    return _storage_bytes(found)


def _storage_bytes(buffers: list[object]) -> int:
    seen: dict[int, int] = {}
    for b in buffers:
        if isinstance(b, torch.Tensor):
            if b.device.type == "meta":
                continue
            st = b.untyped_storage()
            seen[st.data_ptr()] = max(seen.get(st.data_ptr(), 0), st.nbytes())
        else:
            base = b
            while isinstance(base.base, np.ndarray):
                base = base.base
            ptr = base.__array_interface__["data"][0]
            seen[ptr] = max(seen.get(ptr, 0), base.nbytes)
    return sum(seen.values())


def can_measure() -> bool:
    """Whether `measure_step_peak` can run now: no profiler or tracemalloc session already open here."""
    return not torch.autograd.profiler._is_profiler_enabled and not tracemalloc.is_tracing()


def measure_step_peak(step: Callable[[], object]) -> int:
    """Peak bytes allocated while `step` runs, above what existed before it.

    The torch allocator's peak comes from the profiler's memory events (every
    CPU tensor allocation and free, in time order); NumPy and Python memory
    from tracemalloc. The two peaks are added, an upper bound: they need not
    coincide, and tracemalloc also counts what other threads of the process
    allocate meanwhile. Needs `can_measure()`. Kineto's per-session lines stay off
    stderr (`KINETO_QUIET`) unless this process profiled before or the user set its level.
    """
    os.environ.setdefault(*KINETO_QUIET)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        tracemalloc.start()
        try:
            step()
            _, py_peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    live = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        live += e.nbytes()
        peak = max(peak, live)
    return peak + py_peak
