"""DropBack on the lean runtime: the torch optimizer's semantics on a NumPy `Network`.

The same functional core as `common/device/dropback.py` (`dropback_select`
over the network's flat weight and gradient buffers), the same state (the
tracked flat positions and w0 there, 12 bytes a tracked weight) and the same
freeze rule, so given the same gradients both keep the same tracked set and
values bit for bit. What differs is only where gradients come from: the
network's hand-written backward instead of autograd.
"""

from dataclasses import dataclass, field

import numpy as np

from dropfleet.common.device.budget import DENSE_STATE_BYTES_PER_TRACKED, FIXED_STATE_BYTES
from dropfleet.common.device.dropback_core import Scratch, dropback_select
from dropfleet.common.device.lean.network import Network
from dropfleet.common.errors import ConfigError
from dropfleet.common.model.layout import model_layout
from dropfleet.common.model.sparse import SparseModel, SparseTensor, initial_at_tracked


@dataclass
class LeanDropBack:
    """DropBack with tracked budget `k` and learning rate `lr` over all of `network`'s weights."""

    network: Network
    lr: float
    k: int
    freeze_after: int | None = None
    tracked: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    initial: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    threshold: float = 0.0
    steps: int = 0
    frozen: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.k, int) or self.k < 1:
            raise ConfigError(f"Invalid tracked budget k: {self.k!r} (must be an int >= 1)")
        if not self.lr > 0.0:
            raise ConfigError(f"Invalid learning rate: {self.lr!r} (must be > 0)")
        if self.freeze_after is not None and self.freeze_after < 0:
            raise ConfigError(f"Invalid freeze_after: {self.freeze_after!r} (must be None or an int >= 0)")
        # N-sized work buffers, reused by every step (as the torch optimizer keeps its own).
        self._scratch = Scratch.empty(self.network.params.size)

    @property
    def num_tracked(self) -> int:
        return int(self.tracked.size)

    def state_bytes(self) -> int:
        """Bytes kept across steps: the torch optimizer's figure (positions and w0 there)."""
        return FIXED_STATE_BYTES + DENSE_STATE_BYTES_PER_TRACKED * self.num_tracked

    def held_bytes(self) -> int:
        """Bytes held between steps: weights, gradients, the step's scratch, the tracked state."""
        arrays = (self.network.params, self.network.grads, *self._scratch, self.tracked, self.initial)
        return sum(a.nbytes for a in arrays)

    def start_from(self, sparse: SparseModel) -> None:
        """Start from a published model, as the torch path's `load_deltas_` then `set_tracked`:
        w = w0 + delta at the tracked positions; past k, the farthest from w0 stay (equal
        distances in the order given) and the rest return to w0."""
        layout = model_layout(sparse.model_id)
        if layout.numel != self.network.params.size:
            raise ConfigError(f"{sparse.model_id} does not fit this network")
        params, positions, bases = self.network.params, [], []
        for t, (idx, base), slot in zip(
            sparse.tensors, initial_at_tracked(sparse), layout.tensors, strict=True
        ):
            at = slot.offset + np.asarray(idx, np.int64)
            params[at] += t.values.astype(np.float32)  # indices are unique: a plain add is index_add_
            positions.append(at)
            bases.append(np.asarray(base, np.float32))
        gidx, gbase = np.concatenate(positions), np.concatenate(bases)
        if gidx.size > self.k:
            order = np.argsort(-np.abs(params[gidx] - gbase), kind="stable")
            drop, keep = order[self.k :], order[: self.k]
            params[gidx[drop]] = gbase[drop]
            gidx, gbase = gidx[keep], gbase[keep]
        order = np.argsort(gidx, kind="stable")
        self.tracked, self.initial, self.threshold = gidx[order], gbase[order], 0.0

    @property
    def training(self) -> bool:
        return self.network.training

    @training.setter
    def training(self, mode: bool) -> None:
        self.network.training = mode

    @property
    def bn_momentum(self) -> float:
        return self.network.bn_momentum

    @bn_momentum.setter
    def bn_momentum(self, momentum: float) -> None:
        self.network.bn_momentum = momentum

    @property
    def buffers(self) -> dict[str, np.ndarray]:
        return self.network.buffers

    def forward(self, x: np.ndarray) -> np.ndarray:
        """Logits (batch norm on its running statistics unless training)."""
        return self.network.forward(x)

    def train_step(self, x: np.ndarray, labels: np.ndarray) -> float:
        """Forward, backward and one DropBack step on a batch; the batch's mean cross-entropy."""
        loss = self.network.loss_and_grads(x, labels)
        self.step()
        return loss

    def step(self) -> None:
        """One DropBack step from the gradients in `network.grads`."""
        frozen = self.frozen or (self.freeze_after is not None and self.steps >= self.freeze_after)
        result = dropback_select(
            self.network.params,
            self.network.grads,
            self.tracked,
            self.initial,
            lr=[(self.network.params.size, self.lr)],
            k=self.k,
            threshold=self.threshold,
            frozen=frozen,
            scratch=self._scratch,
        )
        self.tracked, self.initial, self.threshold = result
        self.steps, self.frozen = self.steps + 1, frozen

    def to_sparse(self, model_id: str, seed: int) -> SparseModel:
        """The tracked set as a `SparseModel` (what a device sends): per tensor, the tracked local
        indices and their deltas w - w0."""
        layout = model_layout(model_id)
        if layout.numel != self.network.params.size:
            have = self.network.params.size
            raise ConfigError(f"{model_id} has {layout.numel} weights, the network {have}")
        deltas = self.network.params[self.tracked] - self.initial
        ends = np.searchsorted(self.tracked, layout.offsets[1:])
        tensors, start = [], 0
        for slot, stop in zip(layout.tensors, ends, strict=True):
            local = self.tracked[start:stop] - slot.offset
            tensors.append(SparseTensor(slot.name, slot.shape, local, deltas[start:stop]))
            start = stop
        return SparseModel(seed=seed, model_id=model_id, tensors=tuple(tensors))
