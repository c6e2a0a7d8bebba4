"""Streaming DropBack on the lean runtime: train from a seed and k tracked weights, on NumPy alone.

The torch trainer's semantics (`common/device/streaming.py`) with the layers
of `network.py`: each layer's parameters (or, for a Linear layer with
`block_weights`, a block of its rows) are regenerated from the seed plus the
tracked values just before the layer runs, forward and again in backward, and
dropped right after. A Linear layer's backward scores its weight block by
block, then its bias; any other layer with parameters recomputes its forward
from its saved input on a copy of its buffers (batch-norm statistics move once
a step) and scores its parameters in order. That is the order the torch
trainer offers them to the running top-k, so both share the selection rule
and its ties (`streaming_core.StreamedState`); only float32 sums differ.
"""

import numpy as np

from dropfleet.common.device.lean.network import (
    BN_MOMENTUM,
    LayerStep,
    batch_norm_buffers,
    cross_entropy,
    layer_backward,
    layer_forward,
)
from dropfleet.common.device.streaming_core import StreamedState
from dropfleet.common.errors import ConfigError
from dropfleet.common.model.arch import Flatten, Linear, ReLU
from dropfleet.common.model.registry import get_model_entry
from dropfleet.common.model.sparse import SparseModel
from dropfleet.common.seed.init_scheme import Backend


class LeanStreamingDropBack:
    """Streaming DropBack of a registered model on NumPy (arguments as `StreamedState`'s)."""

    def __init__(
        self,
        model_id: str,
        seed: int,
        k: int,
        lr: float,
        freeze_after: int | None = None,
        block_weights: int | None = None,
        backend: Backend = "auto",
    ) -> None:
        self.arch = get_model_entry(model_id).arch
        if block_weights is not None and not all(isinstance(x, (Flatten, Linear, ReLU)) for x in self.arch):
            raise ConfigError(f"row blocks need a Linear/ReLU model; {model_id!r} streams whole layers")
        self.state = StreamedState(model_id, seed, k, lr, freeze_after, block_weights, backend)
        slots = iter(self.state.tensors)
        # Each layer's own tensors, (local name, slot), in the order torch registers them.
        self._own = [[(local, next(slots)) for local, _ in layer.params()] for layer in self.arch]
        self.buffers = batch_norm_buffers(self.arch)
        self.training = True
        self.bn_momentum = BN_MOMENTUM  # recalibration averages instead (lean/train.py)

    @property
    def num_tracked(self) -> int:
        return self.state.num_tracked

    def held_bytes(self) -> int:
        """Bytes held between steps: the tracked indices and values (nothing dense)."""
        return self.state.index.nbytes + self.state.value.nbytes

    def load(self, sparse: SparseModel) -> None:
        self.state.load(sparse)

    def to_sparse(self) -> SparseModel:
        return self.state.to_sparse()

    def _params(self, i: int) -> dict[str, np.ndarray]:
        """Layer i's parameters at their current values, made now (dropped by the caller)."""
        return {
            local: self.state.weights(slot, 0, slot.numel)[1].reshape(slot.shape)
            for local, slot in self._own[i]
        }

    def forward(self, x: np.ndarray) -> np.ndarray:
        """Logits, no step (evaluation); batch norm uses its running statistics unless training."""
        for i, layer in enumerate(self.arch):
            if isinstance(layer, Linear):
                x = self._linear_forward(i, x)  # block by block, as in training
                continue
            step = LayerStep(layer, self._params(i), {})
            x = layer_forward(step, x, self.training, self.buffers, str(i), self.bn_momentum)
        return x

    def train_step(self, x: np.ndarray, labels: np.ndarray) -> float:
        """One DropBack step on a batch: forward, the streamed backward that selects, commit.
        Returns the batch's mean cross-entropy."""
        self.state.open_step()
        # Per layer: its input (layers with parameters: backward regenerates them) or what its
        # forward kept (layers without).
        saved: list[np.ndarray | LayerStep | None] = []
        for i, layer in enumerate(self.arch):
            if isinstance(layer, Linear):
                saved.append(x)
                x = self._linear_forward(i, x)
                continue
            step = LayerStep(layer, self._params(i), {})
            saved.append(x if self._own[i] else step)
            x = layer_forward(step, x, True, self.buffers, str(i), self.bn_momentum)
        loss, d = cross_entropy(x, labels)
        for i in reversed(range(len(self.arch))):
            layer = self.arch[i]
            if not any(self._own[: i + 1]):
                break  # nothing upstream has parameters: no input gradient is needed
            if isinstance(layer, Linear):
                d = self._linear_backward(i, saved[i], d, input_grad=any(self._own[:i]))
            elif self._own[i]:
                d = self._layer_backward(i, saved[i], d)
            else:
                d = layer_backward(saved[i], d)
            saved[i] = None  # each layer's input is dropped once its backward is done
        self.state.commit()
        return loss

    def _linear_forward(self, i: int, x: np.ndarray) -> np.ndarray:
        weight, bias = (slot for _, slot in self._own[i])
        cols = x.shape[1]
        b = self.state.weights(bias, 0, bias.numel)[1]
        y = np.empty((x.shape[0], weight.shape[0]), np.float32)
        for r0, r1 in self.state.row_blocks(weight):
            w = self.state.weights(weight, r0 * cols, r1 * cols)[1].reshape(r1 - r0, cols)
            np.matmul(x, w.T, out=y[:, r0:r1])
            y[:, r0:r1] += b[r0:r1]
        return y

    def _linear_backward(self, i: int, x: np.ndarray, d: np.ndarray, input_grad: bool) -> np.ndarray:
        weight, bias = (slot for _, slot in self._own[i])
        cols = x.shape[1]
        dx = np.zeros_like(x) if input_grad else x[:0]
        for r0, r1 in self.state.row_blocks(weight):
            w0, w, where = self.state.weights(weight, r0 * cols, r1 * cols)
            g = d[:, r0:r1]
            if input_grad:
                dx += g @ w.reshape(r1 - r0, cols)
            self.state.absorb(weight, r0 * cols, (g.T @ x).reshape(-1), w0, where)
        b0, _, where = self.state.weights(bias, 0, bias.numel)
        self.state.absorb(bias, 0, d.sum(axis=0), b0, where)
        return dx

    def _layer_backward(self, i: int, x: np.ndarray, d: np.ndarray) -> np.ndarray:
        """Recompute layer i's forward from its input (buffers copied: they moved in forward),
        differentiate it, and offer its parameters' scores in order."""
        regenerated = [self.state.weights(slot, 0, slot.numel) for _, slot in self._own[i]]
        pairs = list(zip(self._own[i], regenerated, strict=True))
        params = {local: w.reshape(slot.shape) for (local, slot), (_, w, _) in pairs}
        grads = {local: np.empty(slot.shape, np.float32) for local, slot in self._own[i]}
        step = LayerStep(self.arch[i], params, grads)
        layer_forward(step, x, True, {k: v.copy() for k, v in self.buffers.items()}, str(i))
        dx = layer_backward(step, d)
        for (local, slot), (w0, _, where) in pairs:
            self.state.absorb(slot, 0, grads[local].reshape(-1), w0, where)
        return dx
