"""Encode and decode `SparseModel` to the proto wire format (proto/sparse_model.proto).

Positions are Golomb-Rice coded gaps (split into a quotient and a remainder
bit stream so both directions are vectorized); values are fp32, fp16, int8 or
int4 with a per-tensor scale, or STC's ternary (signs at the mean magnitude).
`decode` treats its input as hostile: every failure is a `WireFormatError`
with a clear message, never a crash or a corrupt model.
"""

import math
from typing import Literal, NamedTuple, TypeVar

import numpy as np
from google.protobuf.message import DecodeError, Message

from dropfleet.common.errors import ConfigError, PayloadTooLargeError, WireFormatError
from dropfleet.common.model.layout import model_layout
from dropfleet.common.model.sparse import SparseModel, SparseTensor
from dropfleet.proto import sparse_model_pb2 as pb

M = TypeVar("M", bound=Message)
FORMAT_VERSION = 1
CHANGE_FORMAT_VERSION = 2  # values are changes against the global set of `base_version`
DEFAULT_MAX_BYTES = 64 * 1024 * 1024
Precision = Literal["fp32", "fp16", "int8", "int4", "ternary"]
PRECISIONS: tuple[str, ...] = ("fp32", "fp16", "int8", "int4", "ternary")

_ENCODING = {
    "fp32": pb.VALUE_ENCODING_FP32,
    "fp16": pb.VALUE_ENCODING_FP16,
    "int8": pb.VALUE_ENCODING_INT8,
    "int4": pb.VALUE_ENCODING_INT4,
    "ternary": pb.VALUE_ENCODING_TERNARY,
}
_WIDTH = {pb.VALUE_ENCODING_FP32: 4, pb.VALUE_ENCODING_FP16: 2, pb.VALUE_ENCODING_INT8: 1}
# Integer encodings: the largest |q|; value = q * scale (per tensor).
_LEVELS = {"int8": 127, "int4": 7}
_FP16_MAX = float(np.finfo(np.float16).max)
# The largest magnitude each precision carries (int8 scales are fp32).
MAX_VALUE = {
    "fp32": float(np.finfo(np.float32).max),
    "fp16": _FP16_MAX,
    "int8": float(np.finfo(np.float32).max),
    "int4": float(np.finfo(np.float32).max),
    "ternary": float(np.finfo(np.float32).max),
}


def position_floor_bits(n: int, k: int) -> float:
    """log2(C(n, k)): the fewest bits any code needs for k positions out of n."""
    return (math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)) / math.log(2)


def _rice_parameter(gaps: np.ndarray) -> int:
    """The Rice parameter with the fewest total bits, searched near log2(mean gap)."""
    if gaps.size == 0:
        return 0
    center = max(0, int(math.log2(max(float(gaps.mean()), 1.0))))
    best, best_bits = 0, None
    for b in range(max(0, center - 2), min(31, center + 2) + 1):
        bits = int((gaps >> b).sum()) + gaps.size * (1 + b)
        if best_bits is None or bits < best_bits:
            best, best_bits = b, bits
    return best


def encode_rice(x: np.ndarray) -> tuple[int, bytes, bytes]:
    """Non-negative integers as Golomb-Rice codes: (parameter, quotient stream, remainder stream)."""
    x = np.asarray(x, dtype=np.int64)
    b = _rice_parameter(x)
    q = x >> b
    # Unary stream: q one-bits then a zero-bit per entry.
    ends = np.cumsum(q + 1)
    unary = np.ones(int(ends[-1]) if ends.size else 0, dtype=np.uint8)
    unary[ends - 1] = 0
    # Remainder stream: b bits per entry, most significant first.
    if b:
        shifts = np.arange(b - 1, -1, -1, dtype=np.int64)
        rem_bits = ((x[:, None] >> shifts) & 1).astype(np.uint8).reshape(-1)
    else:
        rem_bits = np.zeros(0, dtype=np.uint8)
    return b, np.packbits(unary).tobytes(), np.packbits(rem_bits).tobytes()


_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


def decode_rice(name: str, count: int, b: int, quot: bytes, rem: bytes, total: int) -> np.ndarray:
    """`count` Rice-coded non-negative integers summing to at most `total`; lengths checked first.

    The quotients sum to at most total >> b, so a quotient stream longer than
    that, or a remainder stream of the wrong length, is refused from its size
    alone, and decoding allocates a small constant times the payload (never a
    bit-per-byte copy of a crafted stream).
    """
    if b > 31:
        raise WireFormatError(f"{name}: rice parameter {b} > 31")
    if count == 0:
        if quot or rem:
            raise WireFormatError(f"{name}: coded bytes present for zero entries")
        return np.zeros(0, dtype=np.int64)
    if len(rem) != (count * b + 7) // 8:
        raise WireFormatError(
            f"{name}: remainder stream is {len(rem)} bytes, expected {(count * b + 7) // 8}"
        )
    most = ((total >> b) + count + 7) // 8
    if not (count + 7) // 8 <= len(quot) <= most:
        raise WireFormatError(
            f"{name}: a quotient stream of {len(quot)} bytes cannot hold {count} codes: values out of range "
            f"({(count + 7) // 8} to {most} bytes fit)"
        )
    packed = np.frombuffer(quot, dtype=np.uint8)
    zeros = 8 * packed.size - int(_POPCOUNT[packed].sum(dtype=np.int64))
    if not count <= zeros < count + 8:  # one terminator per code, then at most 7 zero padding bits
        raise WireFormatError(
            f"{name}: quotient stream holds {zeros} terminators for {count} codes "
            "(truncated, or trailing data)"
        )
    unary = np.unpackbits(packed)
    terminators = np.flatnonzero(unary == 0)
    last = int(terminators[count - 1])
    if len(quot) != last // 8 + 1 or unary[last + 1 :].any():
        raise WireFormatError(f"{name}: quotient stream has trailing data")
    del unary
    x = (np.diff(terminators[:count], prepend=-1) - 1) << b
    if b:
        x |= read_bits(name, rem, count, b)
    return x


def encode_positions(indices: np.ndarray) -> tuple[int, bytes, bytes]:
    """Sorted unique indices as Rice-coded gaps (POSITION_CODING_RICE_SPLIT)."""
    return encode_rice(np.diff(indices.astype(np.int64), prepend=-1) - 1)


def decode_positions(name: str, count: int, numel: int, b: int, quot: bytes, rem: bytes) -> np.ndarray:
    """Rice-coded gaps back to strictly increasing indices below `numel`."""
    gaps = decode_rice(name, count, b, quot, rem, numel)
    if count == 0:
        return gaps
    if int(gaps.max()) >= numel:  # also keeps the cumulative sum far from int64 overflow
        raise WireFormatError(f"{name}: index out of range [0, {numel})")
    indices = np.cumsum(gaps + 1) - 1
    if int(indices[-1]) >= numel:
        raise WireFormatError(f"{name}: index {int(indices[-1])} out of range [0, {numel})")
    return indices


def rice_set(values: np.ndarray) -> pb.RiceSet:
    """Sorted unique non-negative integers as a `RiceSet`."""
    if values.size == 0:
        return pb.RiceSet()
    b, quot, rem = encode_positions(values)
    return pb.RiceSet(count=int(values.size), rice_parameter=b, quotients=quot, remainders=rem)


def read_rice_set(name: str, s: pb.RiceSet, bound: int) -> np.ndarray:
    """A `RiceSet` of integers below `bound` (untrusted)."""
    if s.count > bound:
        raise WireFormatError(f"{name}: {s.count} entries, at most {bound} fit")
    return decode_positions(name, s.count, bound, s.rice_parameter, s.quotients, s.remainders)


def zigzag(q: np.ndarray) -> np.ndarray:
    """Signed integers to non-negative ones, small magnitudes first: 0, -1, 1, -2, ... -> 0, 1, 2, 3, ..."""
    q = np.asarray(q, dtype=np.int64)
    return np.where(q >= 0, 2 * q, -2 * q - 1)


def unzigzag(z: np.ndarray) -> np.ndarray:
    return np.where(z & 1, -((z + 1) >> 1), z >> 1)


def read_bits(name: str, data: bytes, count: int, b: int) -> np.ndarray:
    """`count` big-endian fields of `b` <= 31 bits packed back to back, as int64."""
    starts = np.arange(count, dtype=np.int64) * b
    padded = np.zeros(len(data) + 5, dtype=np.uint8)
    padded[: len(data)] = np.frombuffer(data, dtype=np.uint8)
    first = starts >> 3
    window = np.zeros(count, dtype=np.int64)
    for i in range(5):  # a field of <= 31 bits starting at any bit spans at most 5 bytes
        window = (window << 8) | padded[first + i]
    if (padded[len(data) - 1] if data else 0) & ((1 << ((-count * b) % 8)) - 1):
        raise WireFormatError(f"{name}: remainder stream has non-zero padding")
    return (window >> (40 - b - (starts & 7))) & ((1 << b) - 1)


def quantize_values(values: np.ndarray, precision: str) -> tuple[np.ndarray, float]:
    """Values as the receiver will see them, and the integer encodings' scale (0.0 otherwise)."""
    v = np.asarray(values, dtype=np.float32)
    if precision == "fp32":
        return v.copy(), 0.0
    if precision == "fp16":
        if v.size and float(np.abs(v).max()) > _FP16_MAX:
            raise WireFormatError(f"a value exceeds the fp16 range ({_FP16_MAX})")
        return v.astype(np.float16).astype(np.float32), 0.0
    if precision in _LEVELS:
        q, scale = _quantize_int(v, _LEVELS[precision])
        return q.astype(np.float32) * scale, float(scale)
    if precision == "ternary":
        negative, scale = _quantize_ternary(v)
        return np.where(negative, -scale, scale).astype(np.float32), float(scale)
    raise ConfigError(f"precision must be one of {PRECISIONS}, got {precision!r}")


def _quantize_int(v: np.ndarray, levels: int) -> tuple[np.ndarray, np.float32]:
    peak = float(np.abs(v).max()) if v.size else 0.0
    scale = np.float32(peak / levels) if peak > 0 else np.float32(1.0)
    return np.clip(np.rint(v / scale), -levels, levels).astype(np.int8), scale


def _quantize_ternary(v: np.ndarray) -> tuple[np.ndarray, np.float32]:
    """STC's ternary code of sparse values: each one's sign, at their mean magnitude."""
    mean = float(np.abs(v).mean(dtype=np.float64)) if v.size else 0.0  # re-encodes to the same scale
    return v < 0, np.float32(mean) if mean > 0 else np.float32(1.0)


def _encode_values(values: np.ndarray, precision: str) -> dict[str, object]:
    """The value fields of a `pb.SparseTensor`; integer levels Rice-coded where that is smaller."""
    v = np.asarray(values, dtype=np.float32)
    if precision == "fp32":
        return {"value_encoding": pb.VALUE_ENCODING_FP32, "values": v.astype("<f4").tobytes()}
    if precision == "fp16":
        quantize_values(v, "fp16")  # range check
        return {"value_encoding": pb.VALUE_ENCODING_FP16, "values": v.astype("<f2").tobytes()}
    if precision == "ternary":
        negative, scale = _quantize_ternary(v)
        return {
            "value_encoding": pb.VALUE_ENCODING_TERNARY,
            "values": np.packbits(negative).tobytes(),
            "int8_scale": float(scale),
        }
    if precision not in _LEVELS:
        raise ConfigError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    q, scale = _quantize_int(v, _LEVELS[precision])
    if precision == "int8":
        fixed = {"value_encoding": pb.VALUE_ENCODING_INT8, "values": q.tobytes()}
    else:
        nibbles = np.zeros(q.size + q.size % 2, np.uint8)
        nibbles[: q.size] = q.astype(np.uint8) & 0x0F
        fixed = {
            "value_encoding": pb.VALUE_ENCODING_INT4,
            "values": (nibbles[0::2] | (nibbles[1::2] << 4)).tobytes(),
        }
    b, quot, rem = encode_rice(zigzag(q))
    if len(quot) + len(rem) < len(fixed["values"]):
        fixed = {
            "value_encoding": pb.VALUE_ENCODING_INT_RICE,
            "values": quot,
            "value_rice_parameter": b,
            "value_remainders": rem,
        }
    return {**fixed, "int8_scale": float(scale)}


def _decode_values(name: str, t: pb.SparseTensor) -> np.ndarray:
    count, encoding, data, scale = t.count, t.value_encoding, t.values, t.int8_scale
    if encoding != pb.VALUE_ENCODING_INT_RICE and (t.value_rice_parameter or t.value_remainders):
        raise WireFormatError(f"{name}: value Rice fields set for value encoding {encoding}")
    if encoding == pb.VALUE_ENCODING_INT_RICE:
        levels = _LEVELS["int8"]
        z = decode_rice(
            f"{name} values", count, t.value_rice_parameter, data, t.value_remainders, count * 2 * levels
        )
        if z.size and int(z.max()) > 2 * levels:
            raise WireFormatError(f"{name}: Rice-coded integer values must be in [-{levels}, {levels}]")
        q = unzigzag(z)
    elif encoding == pb.VALUE_ENCODING_INT4:
        if len(data) != (count + 1) // 2:
            raise WireFormatError(f"{name}: {len(data)} value bytes for {count} int4 values")
    elif encoding == pb.VALUE_ENCODING_TERNARY:
        if len(data) != (count + 7) // 8:
            raise WireFormatError(f"{name}: {len(data)} value bytes for {count} ternary values")
    elif encoding not in _WIDTH:
        raise WireFormatError(f"{name}: unknown value encoding {encoding}")
    elif len(data) != count * _WIDTH[encoding]:
        raise WireFormatError(
            f"{name}: {len(data)} value bytes for {count} values of width {_WIDTH[encoding]}"
        )
    if encoding == pb.VALUE_ENCODING_FP32:
        values = np.frombuffer(data, dtype="<f4").astype(np.float32)
    elif encoding == pb.VALUE_ENCODING_FP16:
        values = np.frombuffer(data, dtype="<f2").astype(np.float32)
    else:
        if count and not (math.isfinite(scale) and scale > 0):
            raise WireFormatError(f"{name}: integer value scale must be finite and > 0, got {scale}")
        if encoding == pb.VALUE_ENCODING_INT8:
            q = np.frombuffer(data, dtype=np.int8)
        elif encoding == pb.VALUE_ENCODING_TERNARY:
            q = _unpack_signs(name, count, data)
        elif encoding == pb.VALUE_ENCODING_INT4:
            q = _unpack_int4(name, count, data)
        values = q.astype(np.float32) * np.float32(scale)
    if not np.all(np.isfinite(values)):
        raise WireFormatError(f"{name}: values contain NaN or Inf")
    return values


def _unpack_int4(name: str, count: int, data: bytes) -> np.ndarray:
    packed = np.frombuffer(data, dtype=np.uint8)
    nibbles = np.empty(2 * packed.size, np.uint8)
    nibbles[0::2], nibbles[1::2] = packed & 0x0F, packed >> 4
    if nibbles.size > count and nibbles[count]:
        raise WireFormatError(f"{name}: the int4 padding nibble must be 0")
    q = nibbles[:count].astype(np.int8)
    q[q > 7] -= 16
    if np.any(q == -8):
        raise WireFormatError(f"{name}: int4 values must be in [-7, 7]")
    return q


def _unpack_signs(name: str, count: int, data: bytes) -> np.ndarray:
    bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8))
    if bits[count:].any():
        raise WireFormatError(f"{name}: the ternary padding bits must be 0")
    return 1 - 2 * bits[:count].astype(np.int8)


class HeldSet(NamedTuple):
    """The global tracked set of one version, as a device that trained from it holds it."""

    version: int
    model: SparseModel


def encode(model: SparseModel, precision: str = "fp32", held: HeldSet | None = None) -> bytes:
    """Serialize a valid sparse model; deterministic bytes for equal input.

    A change-coded model (base version >= 1) with the `held` set of that
    version codes each tensor's positions against it where that is smaller
    (POSITION_CODING_BASE_SET); the reader then needs the same set to decode.
    """
    if precision not in _ENCODING:
        raise ConfigError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    model.validate()
    if held is not None and held.version != model.base_version:
        raise ConfigError(
            f"positions against version {held.version} for changes against {model.base_version}"
        )
    msg = pb.SparseModel(
        format_version=CHANGE_FORMAT_VERSION if model.base_version else FORMAT_VERSION,
        seed=model.seed,
        init_scheme=model.init_scheme,
        model_id=model.model_id,
        base_version=model.base_version,
    )
    for i, t in enumerate(model.tensors):
        base = held.model.tensors[i].indices if held is not None else None
        msg.tensors.append(
            pb.SparseTensor(
                name=t.name,
                shape=list(t.shape),
                count=t.count,
                **_position_fields(t.indices, base),
                **_encode_values(t.values, precision),
            )
        )
    return msg.SerializeToString(deterministic=True)


def _position_fields(indices: np.ndarray, base: np.ndarray | None) -> dict[str, object]:
    """The position fields of a `pb.SparseTensor`: Rice-coded gaps, or changes to `base` where smaller."""
    b, quot, rem = encode_positions(indices) if indices.size else (0, b"", b"")
    fields: dict[str, object] = {
        "position_coding": pb.POSITION_CODING_RICE_SPLIT,
        "rice_parameter": b,
        "rice_quotients": quot,
        "rice_remainders": rem,
    }
    if base is None or not indices.size:
        return fields
    removed = rice_set(np.flatnonzero(~np.isin(base, indices, assume_unique=True)))
    added = rice_set(indices[~np.isin(indices, base, assume_unique=True)])
    if removed.ByteSize() + added.ByteSize() < len(quot) + len(rem):
        return {"position_coding": pb.POSITION_CODING_BASE_SET, "base_removed": removed, "base_added": added}
    return fields


def _decode_tensor_positions(
    name: str, t: pb.SparseTensor, numel: int, base_version: int, held: HeldSet | None, i: int
) -> np.ndarray:
    base_fields = t.HasField("base_removed") or t.HasField("base_added")
    if t.position_coding == pb.POSITION_CODING_RICE_SPLIT or not t.count:
        if base_fields:
            raise WireFormatError(f"{name}: base-set fields with position coding {t.position_coding}")
        return decode_positions(name, t.count, numel, t.rice_parameter, t.rice_quotients, t.rice_remainders)
    if t.position_coding != pb.POSITION_CODING_BASE_SET:
        raise WireFormatError(f"{name}: unknown position coding {t.position_coding}")
    if t.rice_parameter or t.rice_quotients or t.rice_remainders:
        raise WireFormatError(f"{name}: Rice gap fields with positions coded against a base set")
    if not base_version:
        raise WireFormatError(f"{name}: positions against a base set in a model of deltas (no base version)")
    if held is None or held.version != base_version:
        holds = "no global set" if held is None else f"version {held.version}"
        raise WireFormatError(
            f"{name}: positions are coded against global version {base_version}; the reader holds {holds}"
        )
    base = held.model.tensors[i].indices
    removed = read_rice_set(f"{name} removed", t.base_removed, base.size)
    added = read_rice_set(f"{name} added", t.base_added, numel)
    if np.isin(added, base, assume_unique=True).any():
        raise WireFormatError(f"{name}: an added position is already in the base set")
    keep = np.ones(base.size, bool)
    keep[removed] = False
    indices = np.sort(np.concatenate([base[keep], added]))
    if indices.size != t.count:
        raise WireFormatError(f"{name}: {indices.size} positions for a count of {t.count}")
    return indices


def parse(data: bytes, message: M, max_bytes: int, what: str) -> M:
    """Untrusted bytes into `message`, refused before parsing when too large; `what` names it in errors."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise WireFormatError(f"expected bytes, got {type(data).__name__}")
    if len(data) > max_bytes:
        raise PayloadTooLargeError(f"payload of {len(data)} bytes exceeds the limit of {max_bytes}")
    try:
        message.ParseFromString(bytes(data))
    except DecodeError as exc:
        raise WireFormatError(f"malformed or truncated {what}: {exc}") from None
    return message


def decode(data: bytes, max_bytes: int = DEFAULT_MAX_BYTES, held: HeldSet | None = None) -> SparseModel:
    """Parse and fully validate untrusted bytes into a `SparseModel`.

    Positions coded against a base set resolve against `held`, which must be
    the version the values are changes against.
    """
    msg = parse(data, pb.SparseModel(), max_bytes, "sparse model")
    if msg.format_version not in (FORMAT_VERSION, CHANGE_FORMAT_VERSION):
        raise WireFormatError(
            f"unsupported format version {msg.format_version} "
            f"(supported: {FORMAT_VERSION}, {CHANGE_FORMAT_VERSION})"
        )
    if (msg.format_version == CHANGE_FORMAT_VERSION) != (msg.base_version > 0):
        raise WireFormatError(
            f"format version {msg.format_version} with base version {msg.base_version}: "
            f"version {CHANGE_FORMAT_VERSION} (changes) needs a base version >= 1, version 1 none"
        )
    try:
        expected = model_layout(msg.model_id).shapes
    except KeyError as exc:
        raise WireFormatError(str(exc)) from None
    if len(msg.tensors) != len(expected):
        raise WireFormatError(
            f"model {msg.model_id!r} has {len(expected)} tensors, payload has {len(msg.tensors)}"
        )
    tensors = []
    for t, (name, shape) in zip(msg.tensors, expected.items(), strict=True):
        if t.name != name or tuple(t.shape) != shape:
            raise WireFormatError(
                f"tensor {t.name!r} {tuple(t.shape)} does not match "
                f"model {msg.model_id!r}: expected {name!r} {shape}"
            )
        numel = math.prod(shape)
        if t.count > numel:
            raise WireFormatError(f"{name}: {t.count} tracked entries > {numel} elements")
        # Values first: their length bounds `count` by the payload size before positions unpack.
        values = _decode_values(name, t)
        indices = _decode_tensor_positions(name, t, numel, msg.base_version, held, len(tensors))
        tensors.append(SparseTensor(name, shape, indices, values))
    model = SparseModel(
        seed=msg.seed,
        model_id=msg.model_id,
        tensors=tuple(tensors),
        init_scheme=msg.init_scheme,
        base_version=msg.base_version,
    )
    model.validate()
    return model
