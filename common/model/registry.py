"""Model registry: every architecture dropfleet trains, by id.

The id travels in the wire format, so a receiver can rebuild the exact shapes
and regenerate the initial weights. Ids are part of the protocol: never change
what an existing id builds; add a new id instead. An entry names its layers
(`arch.py`) and holds no torch: `torch_model.build_model` builds the module.
"""

from dataclasses import dataclass

from dropfleet.common.errors import UnknownModelError
from dropfleet.common.model.arch import Arch, cnn_bn_prelu, mlp


@dataclass(frozen=True)
class ModelEntry:
    """A registered architecture: its layers and how it is initialized."""

    model_id: str
    arch: Arch
    init_family: str
    description: str


MODELS: dict[str, ModelEntry] = {
    e.model_id: e
    for e in (
        ModelEntry(
            "mlp-90k",
            mlp(784, 100, 100, 10),
            "torch-default",
            "DropBack paper's 784-100-100-10 MLP, 89,610 parameters",
        ),
        ModelEntry(
            "lenet-300-100",
            mlp(784, 300, 100, 10),
            "torch-default",
            "LeNet-300-100 MLP, 266,610 parameters",
        ),
        ModelEntry(
            "cnn-bn-prelu",
            cnn_bn_prelu(),
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
