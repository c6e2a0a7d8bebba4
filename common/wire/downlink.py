"""The versioned delta downlink: a device gets the global set as changes since the version it holds.

Why a grid. A change coded at a few bits is lossy, so the published set is
*defined* by the coded chain: the server publishes exactly what devices
rebuild. Its values live on a fixed grid, delta = units * 2**grid_exponent
with integer units, and each version's change is a small integer times a
power of two. Any two versions therefore differ by exact integers: a device
that missed rounds gets one message from its version to the current one
(never a chain), and a new device the whole set as the change from version 0
(nothing held). Every value is exact in binary32 on both sides (|units| <
2**24), so server and devices hold the same bits, checked by a digest.

How a version is made (`DownlinkPublisher.publish`): the merged target plus
the error earlier versions left undelivered (server-side error feedback, kept
on the published positions only) is approached by one quantized step per
tensor: at most `levels` (int4: 7, int8: 127) multiples of the smallest power
of two, at least one grid unit, that covers the tensor's largest change.
"""

import dataclasses
import hashlib
import math
import struct
from dataclasses import dataclass, field

import numpy as np

from dropfleet.common.errors import ConfigError, OutOfSyncError, WireFormatError
from dropfleet.common.model.layout import Layout, model_layout
from dropfleet.common.model.sparse import SparseModel, from_positions
from dropfleet.common.seed.init_scheme import INIT_SCHEME_VERSION, SUPPORTED_INIT_SCHEMES
from dropfleet.common.wire.codec import (
    DEFAULT_MAX_BYTES,
    decode_rice,
    encode_rice,
    parse,
    read_bits,
    read_rice_set,
    rice_set,
    unzigzag,
    zigzag,
)
from dropfleet.common.wire.uplink import values_at
from dropfleet.proto import sparse_model_pb2 as pb

DELTA_FORMAT_VERSION = 4  # 4: the digest covers the version number too
DIGEST_BYTES = 16
MAX_UNITS = 2**24  # |units| below this: units * 2**e is exact in binary32
GRID_EXPONENTS = range(-40, 1)
DELTA_LEVELS = {"int8": 127, "int4": 7}  # the largest |q| of one version's change per precision
MAX_SHIFT, MAX_WIDTH = 30, 31


@dataclass(frozen=True, eq=False)
class GlobalSet:
    """One version of the published global tracked set, on the grid."""

    model_id: str
    seed: int
    version: int
    grid_exponent: int
    positions: np.ndarray = field(repr=False)  # sorted unique global flat indices, int64
    units: np.ndarray = field(repr=False)  # int64, |units| < MAX_UNITS
    init_scheme: int = INIT_SCHEME_VERSION

    @classmethod
    def empty(cls, model_id: str, seed: int, grid_exponent: int, version: int = 0) -> "GlobalSet":
        """Version 0 is what a device holds before its first message: nothing."""
        return cls(model_id, seed, version, grid_exponent, np.zeros(0, np.int64), np.zeros(0, np.int64))

    @classmethod
    def on_grid(cls, model: SparseModel, version: int, grid_exponent: int) -> "GlobalSet":
        """`model`'s values rounded to the grid (exact for a set published by this module)."""
        units = np.rint(np.ldexp(model.flat_values().astype(np.float64), -grid_exponent)).astype(np.int64)
        units = np.clip(units, -(MAX_UNITS - 1), MAX_UNITS - 1)
        return cls(
            model.model_id,
            model.seed,
            version,
            grid_exponent,
            model.flat_positions(),
            units,
            model.init_scheme,
        )

    @property
    def num_tracked(self) -> int:
        return int(self.positions.size)

    @property
    def layout(self) -> Layout:
        return model_layout(self.model_id)

    def values(self) -> np.ndarray:
        """The deltas w - w0, float32 (exact)."""
        return np.ldexp(self.units.astype(np.float64), self.grid_exponent).astype(np.float32)

    def to_sparse(self) -> SparseModel:
        template = SparseModel(
            seed=self.seed,
            model_id=self.model_id,
            tensors=SparseModel.empty(self.model_id, self.seed).tensors,
            init_scheme=self.init_scheme,
        )
        return from_positions(template, self.positions, self.values())

    def digest(self) -> bytes:
        """SHA-256 of the set's canonical bytes and its version number, first 16 bytes.

        The version is covered so that a message whose version field was altered in
        transit cannot leave a device believing it holds a version it does not.
        """
        h = hashlib.sha256(b"dropfleet.GlobalSet.v2\0")
        h.update(self.model_id.encode() + b"\0")
        h.update(
            struct.pack(
                "<QIiQQ", self.seed, self.init_scheme, self.grid_exponent, self.version, self.positions.size
            )
        )
        h.update(self.positions.astype("<i8").tobytes())
        h.update(self.units.astype("<i4").tobytes())
        return h.digest()[:DIGEST_BYTES]

    def units_at(self, positions: np.ndarray) -> np.ndarray:
        """Units at sorted `positions` (0 where this set has no entry), int64."""
        out = np.zeros(positions.size, np.int64)
        if self.positions.size == 0 or positions.size == 0:
            return out
        where = np.minimum(np.searchsorted(self.positions, positions), self.positions.size - 1)
        hit = self.positions[where] == positions
        out[hit] = self.units[where[hit]]
        return out


def quantize_toward(previous: GlobalSet, target: SparseModel, version: int, precision: str) -> GlobalSet:
    """The next version: `target`'s positions, coded in one step per tensor and kind of entry.

    Kept entries move by small changes and new ones arrive whole, so each has its
    own step: one scale for both would be set by the new entries and round most
    changes of the kept ones to nothing.
    """
    if precision not in DELTA_LEVELS:
        raise ConfigError(f"a downlink change is coded at {tuple(DELTA_LEVELS)}, got {precision!r}")
    levels = DELTA_LEVELS[precision]
    positions = target.flat_positions()
    held = previous.units_at(positions)
    change = np.ldexp(target.flat_values().astype(np.float64), -previous.grid_exponent) - held
    new = ~np.isin(positions, previous.positions, assume_unique=True)
    step = np.zeros(positions.size, np.int64)
    b = previous.layout.bounds(positions)
    for i in range(len(previous.layout.tensors)):
        for group in (new[b[i] : b[i + 1]], ~new[b[i] : b[i + 1]]):
            where = b[i] + np.flatnonzero(group)
            step[where] = _one_step(change[where], levels)
    units = np.clip(held + step, -(MAX_UNITS - 1), MAX_UNITS - 1)
    return GlobalSet(
        previous.model_id,
        previous.seed,
        version,
        previous.grid_exponent,
        positions,
        units,
        previous.init_scheme,
    )


def _one_step(change: np.ndarray, levels: int) -> np.ndarray:
    """`change` (grid units) as at most `levels` multiples of the smallest power of two that covers it."""
    peak = float(np.abs(change).max()) if change.size else 0.0
    if peak == 0.0:
        return np.zeros(change.size, np.int64)
    shift = max(0, math.ceil(math.log2(peak / levels)))
    while peak / 2.0**shift > levels:  # log2 rounding
        shift += 1
    return np.clip(np.rint(change / 2.0**shift), -levels, levels).astype(np.int64) << shift


def encode_delta(base: GlobalSet, new: GlobalSet) -> bytes:
    """The wire bytes that take a device holding `base` to `new` (base version 0: the whole set)."""
    if (base.model_id, base.seed, base.grid_exponent) != (new.model_id, new.seed, new.grid_exponent):
        raise ConfigError("a delta joins two versions of one run's global set (model, seed, grid)")
    if not base.version < new.version < 2**32:
        raise ConfigError(f"a delta leads forward: base version {base.version}, new {new.version}")
    msg = pb.GlobalDelta(
        format_version=DELTA_FORMAT_VERSION,
        seed=new.seed,
        init_scheme=new.init_scheme,
        model_id=new.model_id,
        base_version=base.version,
        version=new.version,
        grid_exponent=new.grid_exponent,
        digest=new.digest(),
    )
    layout = new.layout
    old_b, new_b = layout.bounds(base.positions), layout.bounds(new.positions)
    for i, slot in enumerate(layout.tensors):
        old = base.positions[old_b[i] : old_b[i + 1]]
        now = new.positions[new_b[i] : new_b[i + 1]]
        units = new.units[new_b[i] : new_b[i + 1]]
        fresh = ~np.isin(now, old, assume_unique=True)
        msg.tensors.append(
            pb.TensorDelta(
                name=slot.name,
                shape=list(slot.shape),
                removed=rice_set(np.flatnonzero(~np.isin(old, now, assume_unique=True))),
                added=rice_set(now[fresh] - slot.offset),
                changes=_pack_integers(units[~fresh] - base.units_at(now[~fresh])),
                values=_pack_integers(units[fresh]),
            )
        )
    return msg.SerializeToString(deterministic=True)


def apply_delta(held: GlobalSet | None, data: bytes, max_bytes: int = DEFAULT_MAX_BYTES) -> GlobalSet:
    """Rebuild the set a delta leads to from the one this device holds (untrusted bytes).

    Malformed bytes raise `WireFormatError`; a delta from a version this device
    does not hold, or whose rebuilt set fails its digest, `OutOfSyncError`:
    the device then holds what it held, and needs the whole set.
    """
    msg = parse(data, pb.GlobalDelta(), max_bytes, "global delta")
    if msg.format_version != DELTA_FORMAT_VERSION:
        raise WireFormatError(
            f"unsupported global delta format version {msg.format_version} "
            f"(supported: {DELTA_FORMAT_VERSION})"
        )
    if msg.init_scheme not in SUPPORTED_INIT_SCHEMES:
        raise WireFormatError(f"unsupported init scheme version {msg.init_scheme}")
    if msg.grid_exponent not in GRID_EXPONENTS:
        raise WireFormatError(f"grid exponent {msg.grid_exponent} outside [{GRID_EXPONENTS[0]}, 0]")
    if not msg.base_version < msg.version:
        raise WireFormatError(f"a delta leads forward: base version {msg.base_version}, new {msg.version}")
    if len(msg.digest) != DIGEST_BYTES:
        raise WireFormatError(f"digest of {len(msg.digest)} bytes, expected {DIGEST_BYTES}")
    try:
        layout = model_layout(msg.model_id)
    except KeyError as exc:
        raise WireFormatError(str(exc)) from None
    base = _base(held, msg)
    if len(msg.tensors) != len(layout.tensors):
        raise WireFormatError(
            f"model {msg.model_id!r} has {len(layout.tensors)} tensors, the delta has {len(msg.tensors)}"
        )
    old_b = layout.bounds(base.positions)
    positions, units = [], []
    for i, (t, slot) in enumerate(zip(msg.tensors, layout.tensors, strict=True)):
        if t.name != slot.name or tuple(t.shape) != slot.shape:
            raise WireFormatError(
                f"tensor {t.name!r} {tuple(t.shape)} does not match model {msg.model_id!r}: "
                f"expected {slot.name!r} {slot.shape}"
            )
        old = base.positions[old_b[i] : old_b[i + 1]] - slot.offset
        old_units = base.units[old_b[i] : old_b[i + 1]]
        removed = read_rice_set(f"{slot.name} removed", t.removed, old.size)
        added = read_rice_set(f"{slot.name} added", t.added, slot.numel)
        keep = np.ones(old.size, bool)
        keep[removed] = False
        if np.isin(added, old, assume_unique=True).any():
            raise WireFormatError(f"{slot.name}: an added position is already in the base set")
        now = np.concatenate([old[keep], added])
        changes = _read_integers(f"{slot.name} changes", int(keep.sum()), t.changes)
        fresh = _read_integers(f"{slot.name} values", added.size, t.values)
        order = np.argsort(now, kind="stable")
        new_units = np.concatenate([old_units[keep] + changes, fresh])[order]
        if new_units.size and int(np.abs(new_units).max()) >= MAX_UNITS:
            raise WireFormatError(f"{slot.name}: a value leaves the grid's exact range (|units| < 2**24)")
        positions.append(now[order] + slot.offset)
        units.append(new_units)
    result = GlobalSet(
        msg.model_id,
        msg.seed,
        msg.version,
        msg.grid_exponent,
        np.concatenate(positions),
        np.concatenate(units),
        msg.init_scheme,
    )
    if result.digest() != msg.digest:
        raise OutOfSyncError(
            f"the set rebuilt from version {base.version} to {msg.version} fails its digest "
            "(the held set differs from the server's)"
        )
    return result


def _base(held: GlobalSet | None, msg: pb.GlobalDelta) -> GlobalSet:
    """What the delta applies to: nothing for base version 0, else the held set of that version."""
    if msg.base_version == 0:
        return GlobalSet.empty(msg.model_id, msg.seed, msg.grid_exponent)
    if held is None or held.version != msg.base_version:
        holds = "nothing" if held is None else f"version {held.version}"
        raise OutOfSyncError(
            f"the delta starts from global version {msg.base_version}; this device holds {holds}"
        )
    if (held.model_id, held.seed, held.init_scheme, held.grid_exponent) != (
        msg.model_id,
        msg.seed,
        msg.init_scheme,
        msg.grid_exponent,
    ):
        raise OutOfSyncError("the delta is for another model, seed or grid than the set this device holds")
    return held


def _pack_integers(x: np.ndarray) -> pb.GridIntegers:
    """Integers after their common power of two: the fewest fixed two's-complement bits, or a
    Rice code of their zigzag where that is smaller (most changes are a step or two)."""
    nonzero = x[x != 0]
    if nonzero.size == 0:
        return pb.GridIntegers()
    shift = int(np.min(_trailing_zeros(np.abs(nonzero))))
    q = x >> shift
    width = max(int(q.max()).bit_length(), int(-q.min() - 1).bit_length()) + 1
    if shift > MAX_SHIFT or width > MAX_WIDTH:
        raise ConfigError(f"a change of {int(np.abs(x).max())} units does not fit the wire")
    b, quot, rem = encode_rice(zigzag(q))
    if len(quot) + len(rem) < (q.size * width + 7) // 8:
        return pb.GridIntegers(shift=shift, rice=True, rice_parameter=b, data=quot, remainders=rem)
    bits = ((q[:, None] >> np.arange(width - 1, -1, -1)) & 1).astype(np.uint8)
    return pb.GridIntegers(shift=shift, width=width, data=np.packbits(bits.reshape(-1)).tobytes())


def _trailing_zeros(x: np.ndarray) -> np.ndarray:
    return np.log2(x & -x).astype(np.int64)


def _read_integers(name: str, count: int, g: pb.GridIntegers) -> np.ndarray:
    if g.shift > MAX_SHIFT or g.width > MAX_WIDTH:
        raise WireFormatError(f"{name}: shift {g.shift} / width {g.width} out of range")
    if g.rice:
        if g.width:
            raise WireFormatError(f"{name}: a Rice code with a fixed width of {g.width}")
        bound = 1 << (MAX_WIDTH + 1)  # zigzag of a MAX_WIDTH-bit integer
        z = decode_rice(name, count, g.rice_parameter, g.data, g.remainders, count * bound)
        if z.size and int(z.max()) >= bound:
            raise WireFormatError(f"{name}: an integer beyond {MAX_WIDTH} bits")
        return unzigzag(z) << g.shift
    if g.rice_parameter or g.remainders:
        raise WireFormatError(f"{name}: Rice fields in a fixed-width code")
    if len(g.data) != (count * g.width + 7) // 8:
        raise WireFormatError(f"{name}: {len(g.data)} bytes for {count} integers of {g.width} bits")
    if g.width == 0:
        return np.zeros(count, np.int64)
    raw = read_bits(name, g.data, count, g.width)
    q = raw - ((raw >> (g.width - 1)) << g.width)  # two's complement
    return q << g.shift


class DownlinkPublisher:
    """The server's side: the current version, the last `keep` versions, and the error not yet delivered.

    `message_for(held)` is what a device holding version `held` is sent: the
    change from it when the server still keeps that version and the change is
    smaller than the whole set, else the whole set (the change from version 0).
    """

    def __init__(self, start: GlobalSet, precision: str, keep: int = 16) -> None:
        if precision not in DELTA_LEVELS:
            raise ConfigError(f"a downlink change is coded at {tuple(DELTA_LEVELS)}, got {precision!r}")
        self.precision, self.keep = precision, keep
        self.current = start
        self.history: dict[int, GlobalSet] = {start.version: start}
        # What earlier versions left undelivered, in value units, at the current positions.
        self.residual = (np.zeros(0, np.int64), np.zeros(0, np.float32))
        self._messages: dict[int | None, bytes] = {}

    def publish(self, target: SparseModel, version: int) -> GlobalSet:
        """The next version, approaching `target` plus the undelivered error (server-side feedback)."""
        positions = target.flat_positions()
        intended = target.flat_values() + values_at(*self.residual, positions)
        new = quantize_toward(
            self.current, from_positions(target, positions, intended), version, self.precision
        )
        self.residual = (positions, (intended - new.values()).astype(np.float32))
        return self._advance(new)

    def republish(self, version: int) -> GlobalSet:
        """The same set under the next version number (a round that kept the global model)."""
        return self._advance(dataclasses.replace(self.current, version=version))

    def message_for(self, held: int | None) -> bytes:
        key = held if held in self.history and held != self.current.version else None
        if key not in self._messages:
            empty = GlobalSet.empty(self.current.model_id, self.current.seed, self.current.grid_exponent)
            whole = encode_delta(empty, self.current)
            change = encode_delta(self.history[key], self.current) if key is not None else whole
            self._messages[key] = min(change, whole, key=len)
        return self._messages[key]

    def _advance(self, new: GlobalSet) -> GlobalSet:
        if new.version <= self.current.version:
            raise ConfigError(f"version {new.version} does not follow {self.current.version}")
        self.current = new
        self.history[new.version] = new
        for old in sorted(self.history)[: -self.keep]:
            del self.history[old]
        self._messages = {}
        return new
