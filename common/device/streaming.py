"""Streaming DropBack: train without ever holding the dense weights.

The ordinary mode (`DropBack` on a materialized model) keeps all N weights
resident. Here a device keeps only the tracked set, k (index, value) pairs:
each layer's weights are regenerated from the seed plus the tracked values
just before the layer runs, forward and again in backward, and dropped right
after. The backward pass scores that layer's weights exactly as `DropBack`
does (|w - w0| after the SGD step: |lr g| for an untracked weight) and merges
its candidates into a running top-k (`running_topk`: compiled, no per-block
allocations, where numba is installed), so the selection streams over layers
and the next tracked set is known when the backward pass ends.

Peak weight memory is then about one layer (its weights, initial values and
gradient) plus the tracked set, or one block of rows of a layer with
`block_weights` (Linear/ReLU models); the price is regenerating every weight
twice per step. Any other sequential model (convolutions, batch norm, PReLU)
streams one layer at a time, recomputing each layer's forward in backward.
"""

import torch
from torch import Tensor, nn
from torch.autograd.function import FunctionCtx

from dropfleet.common.device.budget import Footprint, available_backend, streaming_footprint
from dropfleet.common.device.streaming_core import StreamedState
from dropfleet.common.errors import ConfigError
from dropfleet.common.model.layout import TensorSlot
from dropfleet.common.model.sparse import SparseModel
from dropfleet.common.model.torch_model import build_model
from dropfleet.common.seed.init_scheme import Backend


class StreamingDropBack:
    """DropBack training of a Linear/ReLU model from a seed and k tracked weights.

    Args:
        model_id: a registered model made of Linear layers (e.g. ``mlp-90k``).
        seed: the seed its initial weights are regenerated from.
        k: the tracked budget.
        lr: the SGD learning rate.
        freeze_after: steps after which the tracked set is frozen (None: never).
        block_weights: at most this many weights are materialized at once (a
            block of rows of one layer); None: one whole layer at a time, which
            computes exactly what `DropBack` computes. Smaller blocks sum a
            layer's input gradient block by block, which differs in rounding.

    Weights with equal scores at the k-th place (common: constant input
    pixels give whole rows of equal gradients) are kept by one defined rule,
    the weight scored earlier in the step first (`running_topk`), which the
    compiled and NumPy paths share bit for bit. `DropBack` breaks such ties
    its own way (tracked weights, then position): until the first tie the two
    produce the same model bit for bit, afterwards they drift apart by that
    choice only.

    `backend` ("auto", "numpy", "compiled") picks how w0 is regenerated and
    the top-k kept: compiled kernels where numba is installed, the NumPy
    references otherwise or when asked (same bits, slower).
    """

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
        # The tracked set, regeneration and selection: shared with the lean trainer.
        self._core = StreamedState(model_id, seed, k, lr, freeze_after, block_weights, backend)
        net = build_model(model_id)
        if not isinstance(net, nn.Sequential):
            raise ConfigError(f"streaming mode needs a sequential model, not {type(net).__name__}")
        mlp = all(isinstance(m, (nn.Flatten, nn.Linear, nn.ReLU)) for m in net)
        if block_weights is not None and not mlp:
            raise ConfigError(f"row blocks need a Linear/ReLU model; {model_id!r} streams whole layers")
        self.model_id, self.seed, self.k, self.lr = model_id, seed, k, lr
        self.freeze_after, self.block_weights = freeze_after, block_weights
        self.backend = backend  # "numpy" forces the references (benchmarks, parity tests)
        self._tensors = self._core.tensors
        self.numel = self._core.numel
        self._layers = [(self._tensors[i], self._tensors[i + 1]) for i in range(0, len(self._tensors), 2)]
        # Any other sequential model streams layer by layer: each module's parameters are placeholders
        # without storage, supplied when the module runs (buffers such as batch-norm statistics stay).
        self._net: nn.Sequential | None = None
        if not mlp:
            slots = iter(self._tensors)
            self._modules = []
            for module in net:
                own = [(name, next(slots)) for name, _ in module.named_parameters(recurse=False)]
                for name, p in module.named_parameters(recurse=False):
                    module.register_parameter(name, nn.Parameter(torch.empty(p.shape, device="meta")))
                self._modules.append((module, own))
            self._net = net
        # The weights are not autograd leaves; this empty leaf makes autograd call our backward.
        self._anchor = torch.zeros(0, requires_grad=True)

    # ----- state ---------------------------------------------------------------------
    @property
    def num_tracked(self) -> int:
        return self._core.num_tracked

    @property
    def _index(self) -> Tensor:
        """The tracked global flat indices (int32, sorted), as a tensor view."""
        return torch.from_numpy(self._core.index)

    def state_bytes(self) -> int:
        """Bytes kept across steps: the tracked indices and values, nothing dense."""
        return self._core.state_bytes()

    def footprint(self, activation_bytes: int) -> Footprint:
        """Peak bytes of one step of this trainer (any k), given the batch's activation bytes: the
        closed form the planner uses (`budget.streaming_footprint`), for the backend it runs on."""
        backend = "numpy" if self.backend == "numpy" else available_backend()
        return streaming_footprint(self.model_id, activation_bytes, self.block_weights, backend)

    def freeze(self) -> None:
        """From now on only the tracked weights change and no selection runs."""
        self._core.freeze()

    def load(self, sparse: SparseModel) -> None:
        """Start from a published model: w = w0 + delta, trimmed to the k farthest from w0."""
        self._core.load(sparse)

    def to_sparse(self) -> SparseModel:
        """The tracked set as a `SparseModel` (deltas w - w0, regenerated for k entries only)."""
        return self._core.to_sparse()

    # ----- weights on demand -------------------------------------------------------------
    def _weights(self, meta: TensorSlot, start: int, stop: int) -> tuple[Tensor, Tensor, slice]:
        w0, w, where = self._core.weights(meta, start, stop)
        return torch.from_numpy(w0), torch.from_numpy(w), where

    def _row_blocks(self, meta: TensorSlot) -> list[tuple[int, int]]:
        return self._core.row_blocks(meta)

    # ----- training ----------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        """Logits; with grad enabled, backward streams the step's selection."""
        if self._net is not None:
            for module, own in self._modules:
                x = _StreamedModule.apply(x, self._anchor, self, module, own) if own else module(x)
            return x
        h = x.reshape(x.shape[0], -1)
        for i, (weight, bias) in enumerate(self._layers):
            h = _StreamedLinear.apply(h, self._anchor, self, weight, bias)
            if i < len(self._layers) - 1:
                h = torch.relu(h)
        return h

    __call__ = forward

    # The model and its optimizer are one object, used the way a training loop uses both:
    # zero_grad() opens a step, loss.backward() scores layer by layer, step() commits.
    def train(self, mode: bool = True) -> "StreamingDropBack":
        if self._net is not None:
            self._net.train(mode)  # batch norm: batch statistics, or the running ones
        return self

    def eval(self) -> "StreamingDropBack":
        return self.train(False)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Open a step (the freeze decision is made here: backward must know it)."""
        self._core.open_step()

    def step(self) -> None:
        """Commit what the last backward pass streamed."""
        self._core.commit()

    def _absorb(self, meta: TensorSlot, start: int, grad: Tensor, w0: Tensor, where: slice) -> None:
        """Score a piece's weights after the SGD step and offer them to the top-k (`StreamedState`)."""
        self._core.absorb(meta, start, grad.reshape(-1).numpy(), w0.numpy(), where)


class _StreamedLinear(torch.autograd.Function):
    """y = x W^T + b with W regenerated block by block in forward and again in backward."""

    @staticmethod
    def forward(
        ctx: FunctionCtx,
        x: Tensor,
        anchor: Tensor,
        owner: StreamingDropBack,
        weight: TensorSlot,
        bias: TensorSlot,
    ) -> Tensor:
        cols = x.shape[1]
        _, b, _ = owner._weights(bias, 0, bias.shape[0])
        y = torch.empty(x.shape[0], weight.shape[0])
        for r0, r1 in owner._row_blocks(weight):
            _, w, _ = owner._weights(weight, r0 * cols, r1 * cols)
            y[:, r0:r1] = torch.addmm(b[r0:r1], x, w.view(r1 - r0, cols).t())
        ctx.save_for_backward(x)
        ctx.owner, ctx.weight, ctx.bias = owner, weight, bias
        return y

    @staticmethod
    def backward(ctx: FunctionCtx, grad_out: Tensor) -> tuple[Tensor | None, None, None, None, None]:
        (x,) = ctx.saved_tensors
        owner, cols = ctx.owner, x.shape[1]
        grad_x = torch.zeros_like(x) if ctx.needs_input_grad[0] else None
        for r0, r1 in owner._row_blocks(ctx.weight):
            w0, w, where = owner._weights(ctx.weight, r0 * cols, r1 * cols)
            g = grad_out[:, r0:r1]
            if grad_x is not None:
                grad_x += g @ w.view(r1 - r0, cols)
            owner._absorb(ctx.weight, r0 * cols, g.t() @ x, w0, where)
            del w0, w
        b0, _, where = owner._weights(ctx.bias, 0, ctx.bias.shape[0])
        owner._absorb(ctx.bias, 0, grad_out.sum(0), b0, where)
        return grad_x, None, None, None, None


class _StreamedModule(torch.autograd.Function):
    """Any layer with its parameters regenerated in forward, and again in backward to differentiate it.

    Backward recomputes the layer's forward from its saved input (activation
    checkpointing, one layer at a time) on copies of its buffers, so batch-norm
    running statistics are updated once per step, as without streaming.
    """

    @staticmethod
    def forward(
        ctx: FunctionCtx,
        x: Tensor,
        anchor: Tensor,
        owner: StreamingDropBack,
        module: nn.Module,
        own: list[tuple[str, TensorSlot]],
    ) -> Tensor:
        params = {name: owner._weights(slot, 0, slot.numel)[1].view(slot.shape) for name, slot in own}
        y = torch.func.functional_call(module, params, (x,))
        ctx.save_for_backward(x)
        ctx.owner, ctx.module, ctx.own = owner, module, own
        return y

    @staticmethod
    def backward(ctx: FunctionCtx, grad_out: Tensor) -> tuple[Tensor | None, None, None, None, None]:
        (x,) = ctx.saved_tensors
        owner, module, own = ctx.owner, ctx.module, ctx.own
        regenerated = [owner._weights(slot, 0, slot.numel) for _, slot in own]
        params = {
            name: w.view(slot.shape).requires_grad_()
            for (name, slot), (_, w, _) in zip(own, regenerated, strict=True)
        }
        buffers = {name: b.clone() for name, b in module.named_buffers()}
        with torch.enable_grad():
            x = x.detach().requires_grad_(ctx.needs_input_grad[0])
            y = torch.func.functional_call(module, {**params, **buffers}, (x,))
            inputs = [x, *params.values()] if ctx.needs_input_grad[0] else list(params.values())
            grads = torch.autograd.grad(y, inputs, grad_out)
        grad_x = grads[0] if ctx.needs_input_grad[0] else None
        for (_, slot), (w0, _, where), grad in zip(own, regenerated, grads[-len(own) :], strict=True):
            owner._absorb(slot, 0, grad, w0, where)
        return grad_x, None, None, None, None
