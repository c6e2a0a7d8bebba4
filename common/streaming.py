"""Streaming DropBack: train without ever holding the dense weights.

The ordinary mode (`DropBack` on a materialized model) keeps all N weights
resident. Here a device keeps only the tracked set, k (index, value) pairs:
each layer's weights are regenerated from the seed plus the tracked values
just before the layer runs, forward and again in backward, and dropped right
after. The backward pass scores that layer's weights exactly as `DropBack`
does (|w - w0| after the SGD step: |lr g| for an untracked weight) and merges
its best candidates into a running top-k, so the selection streams over layers
and the next tracked set is known when the backward pass ends.

Peak weight memory is then about one layer (its weights, initial values and
gradient) plus the tracked set, or one block of rows of a layer with
`block_weights` (Linear/ReLU models); the price is regenerating every weight
twice per step. Any other sequential model (convolutions, batch norm, PReLU)
streams one layer at a time, recomputing each layer's forward in backward.
"""

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn
from torch.autograd.function import FunctionCtx

from dropfleet.common import init_compiled
from dropfleet.common.errors import ConfigError
from dropfleet.common.footprint import Footprint
from dropfleet.common.init_scheme import Backend, initial_values
from dropfleet.common.layout import TensorSlot, model_layout
from dropfleet.common.models import build_model
from dropfleet.common.sparse import SparseModel, SparseTensor

# Bytes kept per tracked weight across steps: an int32 flat index and a float32 value.
BYTES_PER_TRACKED = 8
# Initial values are generated this many at a time (the NumPy generator's temporaries are ~100 B each).
REGEN_CHUNK = 4096
NUMPY_REGEN_BYTES_PER_WEIGHT = 112
# The default block when a device's budget needs blocks (bench/memory.py: 2,048 weights).
DEFAULT_BLOCK_WEIGHTS = 2048
# A step's peak (measured against real steps in tests): per weight of the largest piece
# materialized at once (w0, w, gradient, score, the selection's copies: ~19 B), a
# constant for the layer's output, bias and interpreter temporaries, and per tracked
# weight what is kept plus the running top-k's merge copies (a whole layer's first
# top-k is k entries wide; a block's at most a block).
STEP_BYTES_PER_LIVE_WEIGHT = 22
STEP_FIXED_BYTES = 160 * 1024
STEP_BYTES_PER_TRACKED = {"layers": 80, "blocks": 44}


@dataclass
class _Candidates:
    """The running top-k of one step: global flat indices, their new values and scores."""

    index: Tensor
    value: Tensor
    score: Tensor

    @classmethod
    def empty(cls) -> "_Candidates":
        return cls(torch.zeros(0, dtype=torch.int32), torch.zeros(0), torch.zeros(0))

    def full(self, k: int) -> bool:
        return self.score.numel() >= k

    def floor(self) -> float:
        """The score a newcomer must beat to enter a full set: the k-th best so far."""
        return float(self.score.min())

    def merge(self, index: Tensor, value: Tensor, score: Tensor, k: int) -> None:
        """Keep the k best of these and the newcomers."""
        if not self.full(k):
            self.index = torch.cat([self.index, index.to(torch.int32)])
            self.value = torch.cat([self.value, value])
            self.score = torch.cat([self.score, score])
            if self.score.numel() > k:
                keep = torch.topk(self.score, k, sorted=False).indices
                self.index, self.value, self.score = self.index[keep], self.value[keep], self.score[keep]
            return
        # Full: the m newcomers can only displace the m weakest; swap in place, O(m) extra memory.
        m = score.numel()
        if m == 0:
            return
        weakest = torch.topk(self.score, m, largest=False, sorted=False).indices
        contest = torch.cat([self.score[weakest], score])
        winners = torch.topk(contest, m, sorted=False).indices
        from_new = winners >= m
        free = weakest[torch.isin(torch.arange(m), winners[~from_new], invert=True)]  # holders that lost
        pick = winners[from_new] - m
        self.index[free] = index[pick].to(torch.int32)
        self.value[free] = value[pick]
        self.score[free] = score[pick]


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
    pixels give whole rows of equal gradients) may be kept in a different
    choice than `DropBack` makes (it prefers tracked weights, then position);
    until the first such tie the two produce the same model bit for bit, and
    afterwards they drift apart by that choice only.
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
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ConfigError(f"Invalid tracked budget k: {k!r} (must be an int >= 1)")
        if not 0.0 < lr < float("inf"):
            raise ConfigError(f"Invalid learning rate: {lr!r} (must be finite and > 0)")
        net = build_model(model_id)
        if not isinstance(net, nn.Sequential):
            raise ConfigError(f"streaming mode needs a sequential model, not {type(net).__name__}")
        mlp = all(isinstance(m, (nn.Flatten, nn.Linear, nn.ReLU)) for m in net)
        if block_weights is not None and not mlp:
            raise ConfigError(f"row blocks need a Linear/ReLU model; {model_id!r} streams whole layers")
        self.model_id, self.seed, self.k, self.lr = model_id, seed, k, lr
        self.freeze_after = freeze_after
        if block_weights is not None and block_weights < 1:
            raise ConfigError(f"Invalid block_weights: {block_weights!r} (must be None or >= 1)")
        self.block_weights = block_weights
        self.backend = backend  # of the w0 regeneration: "numpy" forces the reference (benchmarks)
        self._steps = 0
        layout = model_layout(model_id)
        self._tensors = layout.tensors
        self.numel = layout.numel
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
        # The whole persistent state: sorted global indices (int32) and the weights there.
        self._index = torch.zeros(0, dtype=torch.int32)
        self._value = torch.zeros(0)
        self._frozen = False
        self._pending: _Candidates | None = None
        self._pending_values: Tensor | None = None  # frozen steps: the tracked values being updated
        # The weights are not autograd leaves; this empty leaf makes autograd call our backward.
        self._anchor = torch.zeros(0, requires_grad=True)

    # ----- state ---------------------------------------------------------------------
    @property
    def num_tracked(self) -> int:
        return int(self._index.numel())

    def state_bytes(self) -> int:
        """Bytes kept across steps: the tracked indices and values, nothing dense."""
        return BYTES_PER_TRACKED * self.num_tracked

    def footprint(self, activation_bytes: int) -> Footprint:
        """Peak bytes of one step of this trainer (any k), given the batch's activation bytes."""
        if self._net is not None:  # one module's parameters at a time
            pieces = [sum(slot.numel for _, slot in own) for _, own in self._modules]
        else:
            pieces = [bias.numel for _, bias in self._layers]
            for weight, _ in self._layers:
                cols = int(np.prod(weight.shape[1:]))
                rows = max(r1 - r0 for r0, r1 in self._row_blocks(weight))
                pieces.append(rows * cols + (0 if self.block_weights else weight.shape[0]))
        live = max(pieces)
        compiled = self.backend != "numpy" and init_compiled.kernel() is not None
        regen = 0 if compiled else NUMPY_REGEN_BYTES_PER_WEIGHT * min(REGEN_CHUNK, live)
        fixed = STEP_BYTES_PER_LIVE_WEIGHT * live + STEP_FIXED_BYTES + regen + activation_bytes
        return Footprint(fixed, STEP_BYTES_PER_TRACKED["blocks" if self.block_weights else "layers"])

    def freeze(self) -> None:
        """From now on only the tracked weights change and no selection runs."""
        self._frozen = True

    def load(self, sparse: SparseModel) -> None:
        """Start from a published model: w = w0 + delta, trimmed to the k farthest from w0."""
        if (sparse.model_id, sparse.seed) != (self.model_id, self.seed):
            raise ConfigError(
                f"model {sparse.model_id!r} seed {sparse.seed} is not {self.model_id!r} seed {self.seed}"
            )
        index, value, score = [], [], []
        for t, meta in zip(sparse.tensors, self._tensors, strict=True):
            w0 = initial_values(
                self.seed, t.name, meta.init, t.indices, sparse.init_scheme, backend=self.backend
            )
            w = torch.from_numpy(w0) + torch.from_numpy(t.values.astype(np.float32))
            index.append(torch.from_numpy(t.indices.astype(np.int64)) + meta.offset)
            value.append(w)
            score.append((w - torch.from_numpy(w0)).abs())
        idx, val, sc = torch.cat(index), torch.cat(value), torch.cat(score)
        if idx.numel() > self.k:  # the same trim as DropBack.set_tracked: stable, farthest first
            keep = torch.from_numpy(np.sort(np.argsort(-sc.numpy(), kind="stable")[: self.k]))
            idx, val = idx[keep], val[keep]
        self._index, self._value = idx.to(torch.int32), val.clone()

    def to_sparse(self) -> SparseModel:
        """The tracked set as a `SparseModel` (deltas w - w0, regenerated for k entries only)."""
        tensors = []
        index = self._index.to(torch.int64)
        for meta in self._tensors:
            mask = (index >= meta.offset) & (index < meta.end)
            local = (index[mask] - meta.offset).numpy()
            w0 = initial_values(self.seed, meta.name, meta.init, local, backend=self.backend)
            tensors.append(SparseTensor(meta.name, meta.shape, local, self._value[mask].numpy() - w0))
        return SparseModel(seed=self.seed, model_id=self.model_id, tensors=tuple(tensors))

    # ----- weights on demand -------------------------------------------------------------
    def _tracked_slice(self, meta: TensorSlot, start: int, stop: int) -> slice:
        """Where flat entries [start, stop) of one tensor lie in the (sorted) tracked index."""
        bounds = torch.tensor([meta.offset + start, meta.offset + stop], dtype=torch.int32)
        lo, hi = torch.searchsorted(self._index, bounds).tolist()
        return slice(lo, hi)

    def _weights(self, meta: TensorSlot, start: int, stop: int) -> tuple[Tensor, Tensor]:
        """(w0, w) at flat entries [start, stop) of one tensor, made now and dropped by the caller."""
        w0 = torch.empty(stop - start)
        for a in range(start, stop, REGEN_CHUNK):  # bounds the generator's temporaries
            b = min(a + REGEN_CHUNK, stop)
            idx = np.arange(a, b, dtype=np.uint64)
            w0[a - start : b - start] = torch.from_numpy(
                initial_values(self.seed, meta.name, meta.init, idx, backend=self.backend)
            )
        w = w0.clone()
        where = self._tracked_slice(meta, start, stop)
        w[self._index[where].to(torch.int64) - (meta.offset + start)] = self._value[where]
        return w0, w

    def _row_blocks(self, meta: TensorSlot) -> list[tuple[int, int]]:
        """Row ranges of a weight matrix holding at most `block_weights` weights each."""
        rows, cols = meta.shape[0], int(np.prod(meta.shape[1:]))
        step = rows if self.block_weights is None else max(1, self.block_weights // cols)
        return [(r, min(r + step, rows)) for r in range(0, rows, step)]

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
        if not self._frozen and self.freeze_after is not None and self._steps >= self.freeze_after:
            self.freeze()
        self._pending = _Candidates.empty()
        self._pending_values = self._value.clone() if self._frozen else None

    def step(self) -> None:
        """Commit what the last backward pass streamed."""
        if self._pending is None:
            raise ConfigError("step() without zero_grad() and backward() first")
        if self._frozen:
            self._value = self._pending_values
        else:
            order = torch.argsort(self._pending.index)
            self._index, self._value = self._pending.index[order], self._pending.value[order]
        self._pending, self._pending_values = None, None
        self._steps += 1

    def _absorb(self, meta: TensorSlot, start: int, grad: Tensor, w0: Tensor) -> None:
        """Score weights [start, start + len) of a tensor after the SGD step; fold the best into the top-k."""
        # In place where possible: a block's temporaries are what peak memory is made of.
        step = grad.reshape(-1).mul_(-self.lr)
        where = self._tracked_slice(meta, start, start + step.numel())
        local = self._index[where].to(torch.int64) - (meta.offset + start)
        moved = self._value[where] + step[local]
        if self._frozen:
            self._pending_values[where] = moved
            return
        score = step.abs()  # |w - w0| of an untracked weight after the step
        score[local] = (moved - w0[local]).abs()
        new = w0.add_(step)
        new[local] = moved
        del step
        if self._pending.full(self.k):  # only what beats the k-th best so far can enter
            best = torch.nonzero(score > self._pending.floor()).view(-1)
            if best.numel() > self.k:
                best = best[torch.topk(score[best], self.k, sorted=False).indices]
        else:
            best = torch.topk(score, min(self.k, score.numel()), sorted=False).indices
        self._pending.merge(best + (meta.offset + start), new[best], score[best], self.k)


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
        _, b = owner._weights(bias, 0, bias.shape[0])
        y = torch.empty(x.shape[0], weight.shape[0])
        for r0, r1 in owner._row_blocks(weight):
            _, w = owner._weights(weight, r0 * cols, r1 * cols)
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
            w0, w = owner._weights(ctx.weight, r0 * cols, r1 * cols)
            g = grad_out[:, r0:r1]
            if grad_x is not None:
                grad_x += g @ w.view(r1 - r0, cols)
            owner._absorb(ctx.weight, r0 * cols, g.t() @ x, w0)
            del w0, w
        b0, _ = owner._weights(ctx.bias, 0, ctx.bias.shape[0])
        owner._absorb(ctx.bias, 0, grad_out.sum(0), b0)
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
            for (name, slot), (_, w) in zip(own, regenerated, strict=True)
        }
        buffers = {name: b.clone() for name, b in module.named_buffers()}
        with torch.enable_grad():
            x = x.detach().requires_grad_(ctx.needs_input_grad[0])
            y = torch.func.functional_call(module, {**params, **buffers}, (x,))
            inputs = [x, *params.values()] if ctx.needs_input_grad[0] else list(params.values())
            grads = torch.autograd.grad(y, inputs, grad_out)
        grad_x = grads[0] if ctx.needs_input_grad[0] else None
        for (_, slot), (w0, _), grad in zip(own, regenerated, grads[-len(own) :], strict=True):
            owner._absorb(slot, 0, grad, w0)
        return grad_x, None, None, None, None
