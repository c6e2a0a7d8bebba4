"""What a training step costs in memory, in closed form: no trainer built, no torch, no numba.

A device's memory budget has to cover the peak of a step, not only what it
keeps between steps: gradients, scratch buffers, the selection's candidates
and the activations of one batch all live at once inside a step. Each trainer
states its peak as `fixed + bytes_per_tracked * k`; here those statements are
computed from the model's layer list (`common/model/arch.py`) and its layout
alone, so the REST API and the ServerApp plan a device's training
(`fleet/profiles.plan_training`) without importing what trains.
`DropBack.footprint` is `dense_footprint`; `StreamingDropBack.footprint`
states its own figures, which tests/common/device/test_budget.py holds equal
to `streaming_footprint`'s; tests/common/device/test_footprint.py holds both
to the peaks measured in real steps.

The streaming trainer's peak depends on how it regenerates w0 and keeps its
top-k: compiled numba kernels or the NumPy references. That is the
`backend` argument here, named by the caller: a device passes what it has
(`available_backend`), a server that plans for devices it cannot see passes
each backend in turn.
"""

import math
from dataclasses import dataclass
from typing import Literal, get_args

from dropfleet.common.errors import ConfigError
from dropfleet.common.model.arch import Flatten, Linear, ReLU, output_shapes
from dropfleet.common.model.layout import Layout
from dropfleet.common.model.registry import get_model_entry
from dropfleet.common.seed.init_scheme import RANGE_CHUNK

# How a device trains, fastest first: DropBack on dense weights, streaming one layer at
# a time, streaming in row blocks (fleet/profiles.plan_training chooses by budget).
TrainingMode = Literal["dense", "streaming", "streaming-blocks"]
TRAINERS: tuple[str, ...] = get_args(TrainingMode)
# How a streaming step regenerates w0 and keeps its running top-k: numba's kernels or NumPy's.
StepBackend = Literal["compiled", "numpy"]
BACKENDS: tuple[str, ...] = get_args(StepBackend)

# Activations of one step, per byte of layer outputs in a forward pass: saved for
# backward, their gradients, and pooling indices (measured: 1.25x on the CNN).
ACTIVATION_FACTOR = 1.5
IMAGE_SHAPE = (1, 28, 28)
FLOAT32_BYTES = 4

# The dense trainer (`common/device/dropback.py`; `DropBack.footprint` is `dense_footprint`).
# Fixed overhead kept between steps (threshold, counters, seed).
FIXED_STATE_BYTES = 64
# What the dense optimizer keeps per tracked weight between steps: an int64 flat position and
# the float32 w0 there. The streaming trainer keeps 8 B (int32 index and value:
# streaming_core.STREAMING_STATE_BYTES_PER_TRACKED); neither is a wire entry.
DENSE_STATE_BYTES_PER_TRACKED = 12
# A step's peak, per weight of the model: weights, gradient and step/score/mask
# scratch are held (17 B); the first step of a round scores every weight against
# a zero bar, so its candidate indices, scores and partition copies add ~20 B.
DENSE_STEP_BYTES_PER_WEIGHT = 38
# A step's peak per tracked weight: what is kept plus the selection's pool temporaries
# (measured against real steps in tests/common/device/test_footprint.py).
DENSE_STEP_BYTES_PER_TRACKED = 48

# The streaming trainer (`common/device/streaming.py`, which states the same figures).
# Regenerating with the NumPy reference makes ~100 B of temporaries per value (init_scheme.RANGE_CHUNK).
NUMPY_REGEN_BYTES_PER_WEIGHT = 112
# The block a device streams in when its budget needs blocks. Per-block Python and torch
# dispatch is what a block costs (bench/memory.py): 8,192 weights made a mlp-90k step
# 5.0x SGD's at 0.48x its peak, 2,048 weights 8.4x at 0.40x.
DEFAULT_BLOCK_WEIGHTS = 8192
# A step's peak: per weight of the largest piece materialized at once (w0, w, gradient,
# scores), a constant for the layer's output, bias and interpreter temporaries, and per
# tracked weight what is kept plus the running top-k's candidates (compiled: 1.5k buffers
# of 16 B; the NumPy reference: merge copies).
STREAMING_STEP_BYTES_PER_LIVE_WEIGHT = {"compiled": 20, "numpy": 30}
STREAMING_STEP_FIXED_BYTES = {"compiled": 64 * 1024, "numpy": 96 * 1024}
STREAMING_STEP_BYTES_PER_TRACKED = {"compiled": 52, "numpy": 104}


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


def activation_bytes(model_id: str, batch_size: int) -> int:
    """A bound on the activation memory of one training step at `batch_size`.

    `ACTIVATION_FACTOR` times the float32 outputs of every layer in one forward
    pass, by shape arithmetic over the model's layers. A flatten's output is a
    view of its input: no memory of its own.
    """
    arch = get_model_entry(model_id).arch
    shapes = output_shapes(arch, IMAGE_SHAPE)
    kept = [s for layer, s in zip(arch, shapes, strict=True) if not isinstance(layer, Flatten)]
    outputs = sum(math.prod(s) for s in kept)
    return int(ACTIVATION_FACTOR * batch_size * outputs * FLOAT32_BYTES)


def dense_footprint(layout: Layout, activation_bytes: int) -> Footprint:
    """Peak bytes of one dense DropBack step on a model of this layout.

    Adds one copy of the largest tensor (autograd's gradient before it is
    accumulated into the flat buffer) and the batch's activations.
    """
    largest = max((t.numel for t in layout.tensors), default=0)
    fixed = (
        FIXED_STATE_BYTES
        + DENSE_STEP_BYTES_PER_WEIGHT * layout.numel
        + FLOAT32_BYTES * largest
        + activation_bytes
    )
    return Footprint(fixed, DENSE_STEP_BYTES_PER_TRACKED)


def streaming_footprint(
    model_id: str, activation_bytes: int, block_weights: int | None, backend: StepBackend
) -> Footprint:
    """Peak bytes of one streaming DropBack step: the largest piece materialized at once, and k.

    A Linear/ReLU model materializes a whole weight matrix (stated with one more
    weight per row) or, with `block_weights`, a block of its rows, and each bias
    on its own; any other model one layer's parameters at a time (what
    `StreamingDropBack.footprint` states). Raises `ConfigError` for row blocks
    of a model that is not Linear/ReLU.
    """
    arch = get_model_entry(model_id).arch
    mlp = all(isinstance(layer, (Flatten, Linear, ReLU)) for layer in arch)
    if block_weights is not None and not mlp:
        raise ConfigError(f"row blocks need a Linear/ReLU model; {model_id!r} streams whole layers")
    if block_weights is not None and block_weights < 1:
        raise ConfigError(f"Invalid block_weights: {block_weights!r} (must be None or >= 1)")
    if mlp:
        pieces = []
        for layer in arch:
            if isinstance(layer, Linear):
                rows, cols = layer.out_features, layer.in_features
                block_rows = rows if block_weights is None else min(rows, max(1, block_weights // cols))
                pieces.append(block_rows * cols + (0 if block_weights else rows))
                pieces += [rows] if layer.bias else []
    else:
        pieces = [sum(math.prod(shape) for _, shape in layer.params()) for layer in arch]
    live = max(pieces)
    fixed = (
        STREAMING_STEP_BYTES_PER_LIVE_WEIGHT[backend] * live
        + STREAMING_STEP_FIXED_BYTES[backend]
        + activation_bytes
    )
    if backend == "numpy":
        fixed += NUMPY_REGEN_BYTES_PER_WEIGHT * min(RANGE_CHUNK["numpy"], live)
    return Footprint(fixed, STREAMING_STEP_BYTES_PER_TRACKED[backend])


def available_backend() -> StepBackend:
    """What this process's streaming steps compute with: "compiled" where numba compiles both
    kernels, else "numpy" (also when only one compiles: the NumPy statement is the larger in
    every term, so it still covers the step). Imports and may compile numba: a device's
    question, never a server's."""
    from dropfleet.common.device import running_topk
    from dropfleet.common.seed import init_compiled

    return "compiled" if init_compiled.kernel() is not None and running_topk.kernel() is not None else "numpy"
