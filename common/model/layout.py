"""Where each tensor of a model lies in the model's one flat index space.

On the wire a weight is (tensor, local flat index); the optimizer, the merge,
streaming and top-k rank weights across tensors by one global flat index.
This module is the one place that knows the order, shapes, offsets and init
specs of a model's tensors and converts between the two addressings.
"""

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import cache

import numpy as np

from dropfleet.common.model.arch import parameter_shapes
from dropfleet.common.model.layer_init import layer_init_specs
from dropfleet.common.model.registry import get_model_entry
from dropfleet.common.seed.init_scheme import InitSpec


@dataclass(frozen=True)
class TensorSlot:
    """One tensor: its name, shape, first global flat index and (for registered models) init spec."""

    name: str
    shape: tuple[int, ...]
    offset: int
    init: InitSpec | None = None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def end(self) -> int:
        return self.offset + self.numel


@dataclass(frozen=True)
class Layout:
    """The tensors of a model in parameter order, laid end to end."""

    tensors: tuple[TensorSlot, ...]
    offsets: np.ndarray = field(init=False, repr=False, compare=False)  # len(tensors) + 1 bounds

    def __post_init__(self) -> None:
        bounds = np.array([0, *(t.end for t in self.tensors)], dtype=np.int64)
        object.__setattr__(self, "offsets", bounds)

    @classmethod
    def of_shapes(
        cls, shapes: Iterable[tuple[str, tuple[int, ...]]], inits: dict[str, InitSpec] | None = None
    ) -> "Layout":
        slots, offset = [], 0
        for name, shape in shapes:
            slot = TensorSlot(name, tuple(int(s) for s in shape), offset, (inits or {}).get(name))
            slots.append(slot)
            offset = slot.end
        return cls(tuple(slots))

    @property
    def numel(self) -> int:
        return int(self.offsets[-1])

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {t.name: t.shape for t in self.tensors}

    def slot(self, name: str) -> TensorSlot:
        for t in self.tensors:
            if t.name == name:
                return t
        raise KeyError(name)

    def join(self, local: Sequence[np.ndarray]) -> np.ndarray:
        """Global flat indices (int64) from per-tensor local ones, in tensor order."""
        if len(local) != len(self.tensors):
            raise ValueError(f"expected {len(self.tensors)} index arrays, got {len(local)}")
        if not local:
            return np.zeros(0, np.int64)
        return np.concatenate(
            [np.asarray(i, np.int64) + t.offset for i, t in zip(local, self.tensors, strict=True)]
        )

    def bounds(self, positions: np.ndarray) -> np.ndarray:
        """Where each tensor's entries start and end in sorted global `positions`."""
        return np.searchsorted(positions, self.offsets)

    def split(self, positions: np.ndarray) -> list[np.ndarray]:
        """Per tensor, the local flat indices of sorted global `positions`."""
        b = self.bounds(positions)
        return [positions[b[i] : b[i + 1]] - t.offset for i, t in enumerate(self.tensors)]


@cache
def model_layout(model_id: str) -> Layout:
    """The layout of a registered model, with each tensor's init spec (from its arch: no torch)."""
    entry = get_model_entry(model_id)
    return Layout.of_shapes(parameter_shapes(entry.arch), layer_init_specs(entry.arch, entry.init_family))
