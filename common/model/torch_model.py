"""The torch side of a registered model: its nn.Module, seeded and filled with a sparse model's deltas.

The only module of `common/model/` that imports torch, so the registry, the
layout, the init specs and the sparse state stay usable where torch is not
installed (the server's wire and merge code, a lean board). The module is built
from the torch-free description in `arch.py`, layer by layer in its order, so
parameter names and shapes are the arch's by construction.
"""

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from dropfleet.common.model import arch
from dropfleet.common.model.layout import model_layout
from dropfleet.common.model.registry import get_model_entry
from dropfleet.common.model.sparse import SparseModel
from dropfleet.common.seed.init_scheme import INIT_SCHEME_VERSION, initial_tensor

_MODULES: dict[type[arch.Layer], Callable[[Any], nn.Module]] = {
    arch.Flatten: lambda _: nn.Flatten(),
    arch.ReLU: lambda _: nn.ReLU(),
    arch.MaxPool2d: lambda layer: nn.MaxPool2d(layer.kernel_size),
    arch.Linear: lambda layer: nn.Linear(layer.in_features, layer.out_features, bias=layer.bias),
    arch.Conv2d: lambda layer: nn.Conv2d(
        layer.in_channels, layer.out_channels, layer.kernel_size, padding=layer.padding, bias=layer.bias
    ),
    arch.BatchNorm2d: lambda layer: nn.BatchNorm2d(layer.num_features),
    arch.PReLU: lambda layer: nn.PReLU(layer.num_parameters),
}


def torch_layer(layer: arch.Layer) -> nn.Module:
    """The torch module of one arch layer."""
    try:
        return _MODULES[type(layer)](layer)
    except KeyError:
        raise TypeError(f"no torch module for layer {type(layer).__name__}") from None


def build_model(model_id: str) -> nn.Module:
    """A fresh (not yet seeded) instance of the registered architecture."""
    # Built in arch order, so torch's own default init draws its global RNG as it always has.
    return nn.Sequential(*(torch_layer(layer) for layer in get_model_entry(model_id).arch))


def seeded_model(model_id: str, seed: int, scheme: int = INIT_SCHEME_VERSION) -> nn.Module:
    """A registered model whose every parameter holds its seeded initial value."""
    model = build_model(model_id)
    slots = {t.name: t for t in model_layout(model_id).tensors}
    with torch.no_grad():
        for name, p in model.named_parameters():
            slot = slots[name]
            w0 = initial_tensor(seed, name, slot.init, tuple(p.shape), scheme)
            p.copy_(torch.from_numpy(np.ascontiguousarray(w0)))
    return model


def materialize(sparse: SparseModel) -> nn.Module:
    """The dense model w0(seed) + delta, ready to train or evaluate."""
    model = seeded_model(sparse.model_id, sparse.seed, sparse.init_scheme)
    load_deltas_(model, sparse)
    return model


def load_deltas_(model: nn.Module, sparse: SparseModel) -> None:
    """Add the tracked deltas onto a model that holds its seeded initial weights."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for t in sparse.tensors:
            if t.count:
                flat = params[t.name].view(-1)
                idx = torch.from_numpy(t.indices.astype(np.int64))
                flat.index_add_(0, idx, torch.from_numpy(t.values.astype(np.float32)))
