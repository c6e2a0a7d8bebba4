"""The server's memory of each device's latest update, for rounds the device sits out (MIFA).

With partial participation each round's merge sees a different few devices,
and on non-IID data their labels pull the global model a different way every
round: accuracy swings by points from one round to the next. MIFA (Gu et al.,
"Fast Federated Learning in the Presence of Arbitrary Device Unavailability",
NeurIPS 2021) averages, every round, the latest update of *every* device seen:
a device that sits a round out still contributes the change it last asked
for. Only the server holds the memory: devices and the wire are unchanged.

An update is kept as the device's change against the global it trained from,
y = (its tracked values) - (the published delta at those positions), and is
replayed as the published delta plus y, so the merge (any rule) averages
y over the devices tracking each coordinate. An update older than
`max_age` rounds is dropped: staleness stays bounded, and so does the memory
(at most one sparse update per device that trained recently: its own k
positions and values, 8 bytes each). A server-wide cap (`max_bytes`) bounds it
whatever the fleet's size: past it the oldest kept updates are forgotten first,
with a warning saying how many.
"""

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from dropfleet.common.errors import ConfigError
from dropfleet.common.model.sparse import SparseModel, from_positions

logger = logging.getLogger(__name__)
DEFAULT_MAX_BYTES = 256 * 1024 * 1024


@dataclass(frozen=True)
class _Kept:
    server_round: int
    positions: np.ndarray  # sorted global positions
    change: np.ndarray  # float32, against the global the device trained from
    weight: float


class UpdateMemory:
    """Each device's latest accepted update, replayed in the rounds it misses (up to `max_age`)."""

    def __init__(self, max_age: int, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        if max_age < 1:
            raise ConfigError(f"update memory age must be >= 1 round, got {max_age}")
        if max_bytes < 1:
            raise ConfigError(f"update memory cap must be >= 1 byte, got {max_bytes}")
        self.max_age, self.max_bytes = max_age, max_bytes
        self._kept: dict[int, _Kept] = {}
        self.evicted = 0  # updates forgotten to stay under max_bytes, over the run

    def __len__(self) -> int:
        return len(self._kept)

    @property
    def nbytes(self) -> int:
        """The kept updates' positions and values, in bytes."""
        return sum(k.positions.nbytes + k.change.nbytes for k in self._kept.values())

    def augment(
        self,
        server_round: int,
        published: SparseModel,
        fresh: Sequence[tuple[int, SparseModel, float]],
    ) -> list[tuple[SparseModel, float]]:
        """This round's (node, model, weight) updates, then every other kept one re-based on `published`.

        `published` is the global the fresh updates trained from and the
        replayed ones are added to. Fresh updates replace what a node had kept.
        """
        base = _dense(published)
        index = np.int32 if published.numel < 2**31 else np.int64  # 8 bytes a kept weight, not 12
        for node, model, weight in fresh:
            positions = model.flat_positions()
            change = model.flat_values().astype(np.float64) - base[positions]
            self._kept[node] = _Kept(server_round, positions.astype(index), change.astype(np.float32), weight)
        self._kept = {
            node: kept for node, kept in self._kept.items() if server_round - kept.server_round < self.max_age
        }
        self._evict_over_cap(server_round)
        fresh_nodes = {node for node, _, _ in fresh}
        replayed = [
            (from_positions(published, kept.positions, base[kept.positions] + kept.change), kept.weight)
            for node, kept in sorted(self._kept.items())
            if node not in fresh_nodes
        ]
        return [(model, weight) for _, model, weight in fresh] + replayed

    def _evict_over_cap(self, server_round: int) -> None:
        """Forget the oldest kept updates (the largest first among equals) until under `max_bytes`."""
        total = self.nbytes
        if total <= self.max_bytes:
            return
        order = sorted(self._kept, key=lambda n: (self._kept[n].server_round, -self._kept[n].positions.size))
        dropped = 0
        for node in order:
            if total <= self.max_bytes:
                break
            kept = self._kept.pop(node)
            total -= kept.positions.nbytes + kept.change.nbytes
            dropped += 1
        self.evicted += dropped
        logger.warning(
            "Update memory over its cap of %d bytes in round %d: forgot the %d oldest kept update(s); "
            "%d kept (%d bytes). Raise update-memory-bytes, or lower update-memory-rounds.",
            self.max_bytes, server_round, dropped, len(self._kept), total,
        )  # fmt: skip

    def forget(self, node: int) -> None:
        """Drop a node's kept update (its reply was refused: nothing of it should be replayed)."""
        self._kept.pop(node, None)


def _dense(model: SparseModel) -> np.ndarray:
    """The model's delta over all N coordinates (float64): the server may hold dense state."""
    out = np.zeros(model.numel, np.float64)
    out[model.flat_positions()] = model.flat_values()
    return out
