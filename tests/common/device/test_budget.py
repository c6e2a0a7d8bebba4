"""The closed-form footprints are the trainers' own statements, computed without building a trainer."""

import pytest
import torch
from torch import nn

from dropfleet.common.device import budget
from dropfleet.common.device.budget import (
    ACTIVATION_FACTOR,
    IMAGE_SHAPE,
    activation_bytes,
    available_backend,
    dense_footprint,
    streaming_footprint,
)
from dropfleet.common.device.dropback import DropBack
from dropfleet.common.device.streaming import StreamingDropBack
from dropfleet.common.errors import ConfigError
from dropfleet.common.model.arch import output_shapes
from dropfleet.common.model.layout import model_layout
from dropfleet.common.model.registry import MODELS
from dropfleet.common.model.torch_model import build_model

BATCHES = (1, 8, 32, 128)
BLOCKS = (None, budget.DEFAULT_BLOCK_WEIGHTS, 2048, 100)


def hooked_outputs(model_id: str, batch_size: int) -> list[torch.Size]:
    """Every leaf module's output shape in one forward pass on the meta device (no memory, no compute):
    how activation_bytes was counted before it was closed-form."""
    model = build_model(model_id).to("meta")
    shapes: list[torch.Size] = []
    hooks = [
        m.register_forward_hook(lambda _m, _i, out: shapes.append(out.shape))
        for m in model.modules()
        if not list(m.children())
    ]
    try:
        model(torch.empty(batch_size, *IMAGE_SHAPE, device="meta"))
    finally:
        for h in hooks:
            h.remove()
    return shapes


def hooked_activation_bytes(model_id: str, batch_size: int) -> int:
    model = build_model(model_id).to("meta")
    total = 0

    def count(_module: nn.Module, _inputs: object, output: torch.Tensor) -> None:
        nonlocal total
        total += output.numel() * output.element_size()

    leaves = [m for m in model.modules() if not list(m.children()) and not isinstance(m, nn.Flatten)]
    hooks = [m.register_forward_hook(count) for m in leaves]
    try:
        model(torch.empty(batch_size, *IMAGE_SHAPE, device="meta"))
    finally:
        for h in hooks:
            h.remove()
    return int(ACTIVATION_FACTOR * total)


@pytest.mark.parametrize("model_id", sorted(MODELS))
def test_layer_output_shapes_are_torchs(model_id):
    expected = [tuple(s[1:]) for s in hooked_outputs(model_id, 2)]
    assert output_shapes(MODELS[model_id].arch, IMAGE_SHAPE) == expected


@pytest.mark.parametrize("model_id", sorted(MODELS))
@pytest.mark.parametrize("batch", BATCHES)
def test_activation_bytes_equal_the_meta_device_count(model_id, batch):
    assert activation_bytes(model_id, batch) == hooked_activation_bytes(model_id, batch)


@pytest.mark.parametrize("model_id", sorted(MODELS))
@pytest.mark.parametrize("batch", BATCHES)
def test_the_dense_footprint_is_dropbacks(model_id, batch):
    act = activation_bytes(model_id, batch)
    layout = model_layout(model_id)
    assert dense_footprint(layout, act) == DropBack.footprint(layout, act)


def _trainer_backend(backend: str) -> str:
    if backend == "compiled" and available_backend() != "compiled":
        pytest.skip("numba's kernels are not available here")
    return "auto" if backend == "compiled" else "numpy"  # "auto" takes the kernels where they are


@pytest.mark.parametrize("model_id", sorted(MODELS))
@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("backend", ["compiled", "numpy"])
def test_the_streaming_footprint_is_the_trainers(model_id, block, backend):
    act, on = activation_bytes(model_id, 32), _trainer_backend(backend)
    try:
        trainer = StreamingDropBack(model_id, 0, 1, 1.0, block_weights=block, backend=on)
    except ConfigError as exc:  # row blocks of a model that is not Linear/ReLU
        with pytest.raises(ConfigError, match="row blocks need a Linear/ReLU model"):
            streaming_footprint(model_id, act, block, backend)
        assert "row blocks" in str(exc)
        return
    assert streaming_footprint(model_id, act, block, backend) == trainer.footprint(act)
