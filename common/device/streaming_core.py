"""Streaming DropBack's state and per-piece work on NumPy: what the torch and lean trainers share.

A streaming trainer keeps only the tracked set, k (index, value) pairs, and
regenerates each piece of the model (a layer, or a block of a layer's rows)
from the seed plus the tracked values just before it runs, forward and again
in backward (`weights`). After a piece's backward, its weights are scored as
`DropBack` scores them and offered to the step's running top-k (`absorb`);
`commit` makes the top-k the new tracked set. How the pieces are computed is
the trainer's: torch autograd Functions in `streaming.py`, hand-written NumPy
in `lean/streaming.py`. Given the same gradients, in the same order, both keep
the same tracked set bit for bit, because everything that decides it is here.
"""

import numpy as np

from dropfleet.common.device import running_topk
from dropfleet.common.errors import ConfigError
from dropfleet.common.model.layout import TensorSlot, model_layout
from dropfleet.common.model.sparse import SparseModel, SparseTensor
from dropfleet.common.seed.init_scheme import Backend, initial_range, initial_values

# What the streaming trainer keeps per tracked weight across steps: an int32 global flat
# index and the float32 weight there (`state_bytes`). Not the dense optimizer's 12 B
# (int64 index + w0: budget.DENSE_STATE_BYTES_PER_TRACKED), nor a wire entry.
STREAMING_STATE_BYTES_PER_TRACKED = 8


class StreamedState:
    """The tracked set of a streaming DropBack trainer and the step that replaces it.

    Args:
        model_id: a registered model.
        seed: the seed its initial weights are regenerated from.
        k: the tracked budget.
        lr: the SGD learning rate.
        freeze_after: steps after which the tracked set is frozen (None: never).
        block_weights: at most this many weights of a Linear layer are materialized
            at once (a block of its rows); None: whole layers.
        backend: how w0 is regenerated and the top-k kept ("auto", "numpy", "compiled").
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
        if block_weights is not None and block_weights < 1:
            raise ConfigError(f"Invalid block_weights: {block_weights!r} (must be None or >= 1)")
        self.model_id, self.seed, self.k, self.lr = model_id, seed, k, lr
        self.freeze_after, self.block_weights, self.backend = freeze_after, block_weights, backend
        layout = model_layout(model_id)
        self.tensors, self.numel = layout.tensors, layout.numel
        # The whole persistent state: sorted global indices (int32) and the weights there.
        self.index, self.value = np.zeros(0, np.int32), np.zeros(0, np.float32)
        self.frozen = False
        self.steps = 0
        self._pending: running_topk.RunningTopK | running_topk.CompiledTopK | None = None
        self._pending_values: np.ndarray | None = None  # frozen steps: the tracked values being updated

    @property
    def num_tracked(self) -> int:
        return int(self.index.size)

    def state_bytes(self) -> int:
        """Bytes kept across steps: the tracked indices and values, nothing dense."""
        return STREAMING_STATE_BYTES_PER_TRACKED * self.num_tracked

    def freeze(self) -> None:
        """From now on only the tracked weights change and no selection runs."""
        self.frozen = True

    def load(self, sparse: SparseModel) -> None:
        """Start from a published model: w = w0 + delta, trimmed to the k farthest from w0."""
        if (sparse.model_id, sparse.seed) != (self.model_id, self.seed):
            raise ConfigError(
                f"model {sparse.model_id!r} seed {sparse.seed} is not {self.model_id!r} seed {self.seed}"
            )
        index, value, score = [], [], []
        for t, meta in zip(sparse.tensors, self.tensors, strict=True):
            w0 = initial_values(
                self.seed, t.name, meta.init, t.indices, sparse.init_scheme, backend=self.backend
            )
            w = w0 + t.values.astype(np.float32)
            index.append(t.indices.astype(np.int64) + meta.offset)
            value.append(w)
            score.append(np.abs(w - w0))
        idx, val, sc = np.concatenate(index), np.concatenate(value), np.concatenate(score)
        if idx.size > self.k:  # the same trim as DropBack.set_tracked: stable, farthest first
            keep = np.sort(np.argsort(-sc, kind="stable")[: self.k])
            idx, val = idx[keep], val[keep]
        self.index, self.value = idx.astype(np.int32), val.astype(np.float32, copy=True)

    def to_sparse(self) -> SparseModel:
        """The tracked set as a `SparseModel` (deltas w - w0, regenerated for k entries only)."""
        tensors = []
        index = self.index.astype(np.int64)
        for meta in self.tensors:
            mask = (index >= meta.offset) & (index < meta.end)
            local = index[mask] - meta.offset
            w0 = initial_values(self.seed, meta.name, meta.init, local, backend=self.backend)
            tensors.append(SparseTensor(meta.name, meta.shape, local, self.value[mask] - w0))
        return SparseModel(seed=self.seed, model_id=self.model_id, tensors=tuple(tensors))

    # ----- weights on demand ---------------------------------------------------------------
    def tracked_slice(self, meta: TensorSlot, start: int, stop: int) -> slice:
        """Where flat entries [start, stop) of one tensor lie in the (sorted) tracked index."""
        lo, hi = np.searchsorted(self.index, (meta.offset + start, meta.offset + stop))
        return slice(int(lo), int(hi))

    def weights(self, meta: TensorSlot, start: int, stop: int) -> tuple[np.ndarray, np.ndarray, slice]:
        """(w0, w) at flat entries [start, stop) of one tensor, made now and dropped by the caller,
        and where those entries lie in the tracked set."""
        w0 = np.empty(stop - start, np.float32)
        initial_range(self.seed, meta.name, meta.init, start, w0, backend=self.backend)
        w = w0.copy()
        where = self.tracked_slice(meta, start, stop)
        w[self.index[where] - (meta.offset + start)] = self.value[where]
        return w0, w, where

    def row_blocks(self, meta: TensorSlot) -> list[tuple[int, int]]:
        """Row ranges of a weight matrix holding at most `block_weights` weights each."""
        rows, cols = meta.shape[0], int(np.prod(meta.shape[1:]))
        step = rows if self.block_weights is None else max(1, self.block_weights // cols)
        return [(r, min(r + step, rows)) for r in range(0, rows, step)]

    # ----- the step: open, absorb piece by piece (last layer first), commit -------------------
    def open_step(self) -> None:
        """Open a step (the freeze decision is made here: backward must know it)."""
        if not self.frozen and self.freeze_after is not None and self.steps >= self.freeze_after:
            self.freeze()
        self._pending = running_topk.make(self.k, self.backend)
        self._pending_values = self.value.copy() if self.frozen else None

    def absorb(self, meta: TensorSlot, start: int, grad: np.ndarray, w0: np.ndarray, where: slice) -> None:
        """Score weights [start, start + grad.size) of a tensor (tracked at `where`) after the SGD
        step and offer them to the top-k. `grad` (flat, float32) is scaled in place: a piece's
        temporaries make the step's peak."""
        if self._pending is None:
            raise ConfigError("a streamed backward without zero_grad() first")
        step = np.multiply(grad, -self.lr, out=grad)
        local = self.index[where].astype(np.int64) - (meta.offset + start)
        moved = self.value[where] + step[local]
        if self.frozen:
            assert self._pending_values is not None
            self._pending_values[where] = moved
            return
        self._pending.offer(meta.offset + start, step, w0, local, moved)

    def commit(self) -> None:
        """Commit what the last backward pass streamed."""
        if self._pending is None:
            raise ConfigError("step() without zero_grad() and backward() first")
        if self.frozen:
            assert self._pending_values is not None
            self.value = self._pending_values
        else:
            index, value = self._pending.result()
            self.index, self.value = index.astype(np.int32), value
        self._pending, self._pending_values = None, None
        self.steps += 1
