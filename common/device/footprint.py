"""What one training step costs in memory, measured: the peak of real steps, and what a trainer holds.

Each trainer states its step's peak as `fixed + bytes_per_tracked * k`
(`budget.py` computes those statements in closed form, without torch); the
device picks its mode and k from them (`fleet/profiles.plan_training`), and
tests hold every stated footprint to the peak `measure_step_peak` finds in
real steps.
"""

import os
import tracemalloc
from collections.abc import Callable

import numpy as np
import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

# Kineto, the profiler's native layer, writes two "USDT ... profiler_start/stop" lines to stderr
# per session unless its log level is above all of its levels (6: USDT is 5, ERROR 4). It reads
# the level once, when the process first profiles; a user's own setting is kept.
KINETO_QUIET = ("KINETO_LOG_LEVEL", "6")


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
