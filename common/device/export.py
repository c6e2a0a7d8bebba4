"""A published sparse model as a plain PyTorch or ONNX model, for use outside dropfleet.

The dense model is w0(seed) + the tracked deltas. Batch-norm running statistics
do not travel (they are buffers, not weights), so a model with batch norm has
them re-estimated from training examples, as the server does before evaluating.
"""

from pathlib import Path

import numpy as np
import torch
from torch import nn

from dropfleet.common.device.data import Split
from dropfleet.common.device.train import recalibrate_batch_norm
from dropfleet.common.errors import ConfigError
from dropfleet.common.model.sparse import SparseModel
from dropfleet.common.model.torch_model import materialize

FORMATS = ("protobuf", "pt", "onnx")
INPUT_SHAPE = (1, 1, 28, 28)  # one 28x28 grey image, normalized as common/device/data.py does


def has_batch_norm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def dense_model(sparse: SparseModel, calibration: Split | None = None) -> nn.Module:
    """The trained model in eval mode; `calibration` is needed when it has batch norm."""
    model = materialize(sparse)
    if has_batch_norm(model):
        if calibration is None:
            raise ConfigError(f"{sparse.model_id} has batch norm: its statistics need calibration examples")
        recalibrate_batch_norm(model, calibration)
    return model.eval()


def export_state_dict(model: nn.Module, path: Path) -> None:
    """`torch.save` of the state dict: load it into the same architecture (`build_model(model_id)`)."""
    torch.save(model.state_dict(), path)


def export_onnx(model: nn.Module, path: Path) -> None:
    """ONNX (opset 17) with input `image` [batch, 1, 28, 28] and output `logits` [batch, 10].

    Needs the `onnx` package (torch's exporter writes through it).
    """
    try:
        import onnx  # noqa: F401
    except ImportError:
        raise ConfigError("ONNX export needs the onnx package: pip install onnx") from None
    torch.onnx.export(
        model,
        (torch.zeros(INPUT_SHAPE),),
        str(path),
        dynamo=False,  # the TorchScript exporter: no onnxscript needed
        input_names=["image"],
        output_names=["logits"],
        dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
        opset_version=17,
    )


def calibration_split(train: Split, examples: int = 5120) -> Split:
    """The first training examples (never the test set), to re-estimate batch-norm statistics."""
    return train.subset(np.arange(min(examples, len(train))))
