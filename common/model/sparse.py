"""Sparse model state: a seed plus, per tensor, tracked flat indices and deltas.

A `SparseModel` is the only form in which a model leaves a device or the
server. Its weights are w = w0(seed) + delta, where delta is non-zero only at
tracked positions (`values` holds w - w0 there). An empty tracked set is the
seeded initial model itself. No torch here: `torch_model.materialize` builds
the dense nn.Module.
"""

import math
from dataclasses import dataclass, field

import numpy as np

from dropfleet.common.errors import WireFormatError
from dropfleet.common.model.layout import Layout, model_layout
from dropfleet.common.seed.init_scheme import INIT_SCHEME_VERSION, SUPPORTED_INIT_SCHEMES, initial_values


@dataclass(frozen=True, eq=False)
class SparseTensor:
    """Tracked entries of one parameter: sorted unique flat indices and deltas."""

    name: str
    shape: tuple[int, ...]
    indices: np.ndarray = field(repr=False)
    values: np.ndarray = field(repr=False)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def count(self) -> int:
        return int(self.indices.size)

    def validate(self) -> None:
        """Raise `WireFormatError` unless indices and values describe this tensor."""
        if self.indices.ndim != 1 or self.values.ndim != 1:
            raise WireFormatError(f"{self.name}: indices and values must be 1-D")
        if self.indices.size != self.values.size:
            raise WireFormatError(f"{self.name}: {self.indices.size} indices but {self.values.size} values")
        if self.indices.size == 0:
            return
        if self.indices.dtype.kind not in "iu":
            raise WireFormatError(f"{self.name}: indices must be integers")
        if int(self.indices[0]) < 0 or int(self.indices[-1]) >= self.numel:
            raise WireFormatError(
                f"{self.name}: index out of range [0, {self.numel}) "
                f"(min {int(self.indices.min())}, max {int(self.indices.max())})"
            )
        if np.any(np.diff(self.indices) <= 0):
            raise WireFormatError(f"{self.name}: indices must be strictly increasing (no duplicates)")
        if not np.all(np.isfinite(self.values)):
            raise WireFormatError(f"{self.name}: values contain NaN or Inf")


@dataclass(frozen=True, eq=False)
class SparseModel:
    """A whole model as seed + tracked deltas; tensors follow parameter order."""

    seed: int
    model_id: str
    tensors: tuple[SparseTensor, ...]
    init_scheme: int = INIT_SCHEME_VERSION
    # 0: values are deltas w - w0; v >= 1: changes against global version v (common/wire/uplink.py).
    base_version: int = 0

    @property
    def num_tracked(self) -> int:
        return sum(t.count for t in self.tensors)

    @property
    def numel(self) -> int:
        return sum(t.numel for t in self.tensors)

    @property
    def layout(self) -> Layout:
        """Where these tensors lie in one flat index space (from their own names and shapes)."""
        return Layout.of_shapes((t.name, t.shape) for t in self.tensors)

    def flat_positions(self) -> np.ndarray:
        """Tracked positions as sorted global flat indices over the whole model."""
        return self.layout.join([t.indices for t in self.tensors])

    def flat_values(self) -> np.ndarray:
        """The tracked values (float32) in `flat_positions` order."""
        return np.concatenate([np.asarray(t.values, np.float32) for t in self.tensors])

    def tensor(self, name: str) -> SparseTensor:
        for t in self.tensors:
            if t.name == name:
                return t
        raise KeyError(name)

    def validate(self) -> None:
        """Check seed, scheme, and that tensors match the registered architecture."""
        if not 0 <= self.seed < 2**64:
            raise WireFormatError(f"seed must be in [0, 2**64), got {self.seed}")
        if not 0 <= self.base_version < 2**32:
            raise WireFormatError(f"base version must be in [0, 2**32), got {self.base_version}")
        if self.init_scheme not in SUPPORTED_INIT_SCHEMES:
            raise WireFormatError(
                f"unsupported init scheme version {self.init_scheme} "
                f"(supported: {sorted(SUPPORTED_INIT_SCHEMES)})"
            )
        expected = model_layout(self.model_id).shapes
        got = [(t.name, t.shape) for t in self.tensors]
        if got != list(expected.items()):
            raise WireFormatError(
                f"tensors do not match model {self.model_id!r}: expected {list(expected.items())}, got {got}"
            )
        for t in self.tensors:
            t.validate()

    @classmethod
    def empty(cls, model_id: str, seed: int) -> "SparseModel":
        """The seeded initial model: no tracked entries."""
        tensors = tuple(
            SparseTensor(name, shape, np.zeros(0, np.int64), np.zeros(0, np.float32))
            for name, shape in model_layout(model_id).shapes.items()
        )
        return cls(seed=seed, model_id=model_id, tensors=tensors)


def from_positions(template: SparseModel, positions: np.ndarray, values: np.ndarray) -> SparseModel:
    """A model like `template` (id, seed, scheme) holding `values` (as float32) at sorted global positions."""
    values = values.astype(np.float32)
    b = template.layout.bounds(positions)
    tensors = tuple(
        SparseTensor(t.name, t.shape, positions[b[i] : b[i + 1]] - t.offset, values[b[i] : b[i + 1]])
        for i, t in enumerate(template.layout.tensors)
    )
    return SparseModel(
        seed=template.seed, model_id=template.model_id, tensors=tensors, init_scheme=template.init_scheme
    )


def num_weights(model_id: str) -> int:
    """N: how many weights (parameters) a registered model has."""
    return model_layout(model_id).numel


def sparse_from_dense_delta(model_id: str, seed: int, deltas: dict[str, np.ndarray]) -> SparseModel:
    """Sparse model holding every non-zero entry of dense deltas (tests, references)."""
    tensors = []
    for name, shape in model_layout(model_id).shapes.items():
        d = np.asarray(deltas[name], dtype=np.float32).reshape(-1)
        idx = np.flatnonzero(d)
        tensors.append(SparseTensor(name, shape, idx.astype(np.int64), d[idx]))
    return SparseModel(seed=seed, model_id=model_id, tensors=tuple(tensors))


def dense_deltas(sparse: SparseModel) -> dict[str, np.ndarray]:
    """Dense delta arrays (zeros where untracked); O(N), for references and tests."""
    out = {}
    for t in sparse.tensors:
        d = np.zeros(t.numel, dtype=np.float32)
        d[t.indices] = t.values
        out[t.name] = d.reshape(t.shape)
    return out


def initial_at_tracked(sparse: SparseModel) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per tensor: tracked indices and w0 there, regenerated for those k entries only."""
    layout = model_layout(sparse.model_id)
    return [
        (t.indices, initial_values(sparse.seed, t.name, slot.init, t.indices, sparse.init_scheme))
        for t, slot in zip(sparse.tensors, layout.tensors, strict=True)
    ]
