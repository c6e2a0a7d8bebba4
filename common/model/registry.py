"""Model registry: every architecture dropfleet trains, by id.

The id travels in the wire format, so a receiver can rebuild the exact shapes
and regenerate the initial weights. Ids are part of the protocol: never change
what an existing id builds; add a new id instead.
"""

import itertools
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from dropfleet.common.errors import UnknownModelError


def _mlp(*widths: int) -> nn.Module:
    layers: list[nn.Module] = [nn.Flatten()]
    for i, (a, b) in enumerate(itertools.pairwise(widths)):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def _cnn_bn_prelu() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.PReLU(16),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.BatchNorm2d(32),
        nn.PReLU(32),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 7 * 7, 10),
    )


@dataclass(frozen=True)
class ModelEntry:
    """A registered architecture: how to build it and how it is initialized."""

    model_id: str
    build: Callable[[], nn.Module]
    init_family: str
    description: str


MODELS: dict[str, ModelEntry] = {
    e.model_id: e
    for e in (
        ModelEntry(
            "mlp-90k",
            lambda: _mlp(784, 100, 100, 10),
            "torch-default",
            "DropBack paper's 784-100-100-10 MLP, 89,610 parameters",
        ),
        ModelEntry(
            "lenet-300-100",
            lambda: _mlp(784, 300, 100, 10),
            "torch-default",
            "LeNet-300-100 MLP, 266,610 parameters",
        ),
        ModelEntry(
            "cnn-bn-prelu",
            _cnn_bn_prelu,
            "kaiming-normal",
            "two conv blocks with batch norm and PReLU, 20,634 parameters",
        ),
    )
}


def get_model_entry(model_id: str) -> ModelEntry:
    """Registry entry for `model_id`, or a clear error naming the known ids."""
    try:
        return MODELS[model_id]
    except KeyError:
        raise UnknownModelError(
            f"unknown model id {model_id!r}; known: {', '.join(sorted(MODELS))}"
        ) from None


def build_model(model_id: str) -> nn.Module:
    """A fresh (not yet seeded) instance of the registered architecture."""
    return get_model_entry(model_id).build()
