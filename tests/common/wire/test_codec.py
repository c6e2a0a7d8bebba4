"""Wire codec: bit-exact round trips, size near the floor, hostile bytes rejected."""

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dropfleet.common.errors import ConfigError, PayloadTooLargeError, WireFormatError
from dropfleet.common.model.layout import model_layout
from dropfleet.common.model.sparse import SparseModel, SparseTensor
from dropfleet.common.wire.codec import (
    decode,
    encode,
    position_floor_bits,
    quantize_values,
)
from dropfleet.proto import sparse_model_pb2 as pb

SHAPES = model_layout("mlp-90k").shapes
N = sum(math.prod(s) for s in SHAPES.values())


def random_sparse(k: int, seed: int = 0, model_seed: int = 7, scale: float = 0.05) -> SparseModel:
    rng = np.random.default_rng(seed)
    flat = np.sort(rng.choice(N, k, replace=False))
    values = (rng.standard_normal(k) * scale).astype(np.float32)
    tensors, start = [], 0
    for name, shape in SHAPES.items():
        n = math.prod(shape)
        sel = (flat >= start) & (flat < start + n)
        tensors.append(SparseTensor(name, shape, flat[sel] - start, values[sel]))
        start += n
    return SparseModel(seed=model_seed, model_id="mlp-90k", tensors=tuple(tensors))


@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8", "int4", "ternary"])
@pytest.mark.parametrize("k", [0, 1, 2000, 4480, N])
def test_round_trip_bit_for_bit(precision, k):
    model = random_sparse(k)
    data = encode(model, precision)
    back = decode(data)
    assert back.seed == model.seed and back.model_id == model.model_id
    for a, b in zip(model.tensors, back.tensors, strict=True):
        assert np.array_equal(a.indices, b.indices)
        want, _ = quantize_values(a.values, precision)
        assert want.tobytes() == b.values.tobytes()
    assert encode(back, precision) == data


def test_fp32_values_exact_including_denormals_and_signed_zero():
    m = random_sparse(5)
    t = m.tensors[0]
    vals = np.array([1e-45, -0.0, 3.4e38, -1.5, 7.0], dtype=np.float32)[: t.count]
    m2 = SparseModel(m.seed, m.model_id, (SparseTensor(t.name, t.shape, t.indices, vals), *m.tensors[1:]))
    assert decode(encode(m2)).tensors[0].values.tobytes() == vals.tobytes()


def test_positions_near_the_information_floor():
    m = random_sparse(2000)
    data = encode(m, "fp32")
    value_bytes = 4 * 2000
    overhead = len(data) - value_bytes
    assert overhead < 1.1 * position_floor_bits(N, 2000) / 8 + 200  # framing of 6 tensors
    assert abs(position_floor_bits(89610, 2000) / 8 - 1727) < 1


def test_int8_fp16_are_smaller():
    m = random_sparse(4480)
    sizes = [len(encode(m, p)) for p in ("fp32", "fp16", "int8", "int4", "ternary")]
    assert sizes[0] > sizes[1] > sizes[2] > sizes[3] > sizes[4]


def test_int4_packs_two_values_a_byte_and_keeps_them_within_half_a_step():
    m = random_sparse(4481)  # odd counts leave a padding nibble somewhere
    back = decode(encode(m, "int4"))
    for a, b in zip(m.tensors, back.tensors, strict=True):
        if a.count:
            step = float(np.abs(a.values).max()) / 7
            assert np.all(np.abs(a.values - b.values) <= step / 2 + 1e-6 * step)
    uniform = SparseModel(  # levels spread evenly: the fixed width is the smaller code
        m.seed,
        m.model_id,
        tuple(
            SparseTensor(t.name, t.shape, t.indices, np.linspace(-1, 1, t.count, dtype=np.float32))
            for t in m.tensors
        ),
    )
    msg = pb.SparseModel()
    msg.ParseFromString(encode(uniform, "int4"))
    assert all(len(t.values) == (t.count + 1) // 2 for t in msg.tensors if t.count)
    assert {t.value_encoding for t in msg.tensors if t.count} == {pb.VALUE_ENCODING_INT4}


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_peaked_integer_levels_go_rice_coded_with_the_same_values(precision):
    """Normal values put most levels near 0: the Rice code is smaller and decodes to the very values
    the fixed width would have carried."""
    m = random_sparse(4481)
    msg = pb.SparseModel()
    msg.ParseFromString(encode(m, precision))
    width = {"int8": 8, "int4": 4}[precision]
    for t in msg.tensors:
        if t.count > 100:
            assert t.value_encoding == pb.VALUE_ENCODING_INT_RICE
            assert len(t.values) + len(t.value_remainders) < t.count * width / 8
    for a, b in zip(m.tensors, decode(encode(m, precision)).tensors, strict=True):
        assert np.array_equal(b.values, quantize_values(a.values, precision)[0])


def test_rejects_bad_rice_coded_values():
    m = random_sparse(4481)
    for corrupt, needle in (
        (lambda t: setattr(t, "values", bytes(t.values)[:-1]), "values"),  # truncated quotients
        (lambda t: setattr(t, "value_remainders", bytes(t.value_remainders) + b"\0"), "remainder stream"),
        (lambda t: setattr(t, "value_rice_parameter", 32), "rice parameter"),
        # every level 255 (> 2 * 127): an integer outside [-127, 127]
        (
            lambda t: (
                setattr(t, "value_rice_parameter", 8),
                setattr(t, "values", bytes((t.count + 7) // 8)),
                setattr(t, "value_remainders", b"\xff" * t.count),
            ),
            r"\[-127, 127\]",
        ),
        (lambda t: setattr(t, "value_encoding", pb.VALUE_ENCODING_INT8), "Rice fields set"),
    ):
        msg = pb.SparseModel()
        msg.ParseFromString(encode(m, "int8"))
        corrupt(next(t for t in msg.tensors if t.value_encoding == pb.VALUE_ENCODING_INT_RICE))
        _fails(msg, needle)


def test_ternary_is_one_bit_a_value_at_the_mean_magnitude_with_each_sign():
    m = random_sparse(4483)
    back = decode(encode(m, "ternary"))
    msg = pb.SparseModel()
    msg.ParseFromString(encode(m, "ternary"))
    assert all(len(t.values) == (t.count + 7) // 8 for t in msg.tensors)
    for a, b in zip(m.tensors, back.tensors, strict=True):
        if a.count:
            mean = np.float32(np.abs(a.values).mean(dtype=np.float64))
            assert np.array_equal(np.abs(b.values), np.full(a.count, mean, np.float32))
            assert np.array_equal(b.values < 0, a.values < 0)


def test_rejects_bad_ternary_payloads():
    m = random_sparse(51)
    for corrupt, needle in (
        (lambda v: v[:-1], "ternary values"),  # one byte short
        (lambda v: v[:-1] + bytes([v[-1] | 0x01]), "padding bits"),  # a count that is not a multiple of 8
    ):
        msg = pb.SparseModel()
        msg.ParseFromString(encode(m, "ternary"))
        t = next(t for t in msg.tensors if t.count % 8)
        t.values = corrupt(bytes(t.values))
        _fails(msg, needle)
    msg = pb.SparseModel()
    msg.ParseFromString(encode(m, "ternary"))
    next(t for t in msg.tensors if t.count).int8_scale = float("nan")
    _fails(msg, "scale must be finite")


def test_rejects_bad_int4_payloads():
    m = random_sparse(51)
    for corrupt, needle in (
        (lambda v: v[:-1], "int4 values"),  # one byte short
        (lambda v: v[:-1] + bytes([v[-1] | 0x80]), "padding nibble"),  # odd count: set the pad
        (lambda v: bytes([0x08]) + v[1:], r"\[-7, 7\]"),  # q = -8
    ):
        msg = pb.SparseModel()
        msg.ParseFromString(encode(m, "int4"))
        t = next(t for t in msg.tensors if t.count % 2)
        t.values = corrupt(bytes(t.values))
        _fails(msg, needle)


def test_fp16_overflow_refused():
    m = random_sparse(10, scale=1e6)
    with pytest.raises(WireFormatError, match="fp16"):
        encode(m, "fp16")


def test_unknown_precision():
    with pytest.raises(ConfigError, match="fp8"):
        encode(random_sparse(3), "fp8")


def _msg(model: SparseModel) -> pb.SparseModel:
    msg = pb.SparseModel()
    msg.ParseFromString(encode(model))
    return msg


def _fails(msg: pb.SparseModel, needle: str) -> None:
    with pytest.raises(WireFormatError, match=needle):
        decode(msg.SerializeToString())


def test_rejects_unknown_format_and_scheme_versions():
    msg = _msg(random_sparse(50))
    msg.format_version = 2
    _fails(msg, "format version 2")
    msg = _msg(random_sparse(50))
    msg.init_scheme = 9
    _fails(msg, "init scheme version 9")


def test_rejects_unknown_model_and_shape_mismatch():
    msg = _msg(random_sparse(50))
    msg.model_id = "resnet-9000"
    _fails(msg, "resnet-9000")
    msg = _msg(random_sparse(50))
    msg.tensors[0].shape[:] = [100, 785]
    _fails(msg, "does not match")
    msg = _msg(random_sparse(50))
    del msg.tensors[-1]
    _fails(msg, "6 tensors")
    msg = _msg(random_sparse(50))
    msg.tensors[0].name = "evil"
    _fails(msg, "evil")


def test_rejects_out_of_range_and_count_mismatch():
    m = random_sparse(50)
    bias = SparseTensor(m.tensors[-1].name, (10,), np.array([3]), np.array([1.0], np.float32))
    big = SparseModel(m.seed, m.model_id, (*m.tensors[:-1], bias))  # last tensor: 10-element bias
    msg = _msg(big)
    last = msg.tensors[-1]
    last.rice_quotients = bytes([0b11111111, 0b11111111, 0b00000000])  # gap of 16 > 10
    last.rice_parameter = 0
    last.rice_remainders = b""
    _fails(msg, "out of range")
    msg = _msg(big)
    msg.tensors[-1].count = 11
    _fails(msg, "11 tracked entries > 10")
    msg = _msg(big)
    msg.tensors[-1].count = 2
    _fails(msg, "codes|value bytes|truncated")


def test_rejects_nan_inf_and_bad_int8_scale():
    m = random_sparse(50)
    msg = _msg(m)
    t = next(t for t in msg.tensors if t.count)
    vals = bytearray(t.values)
    vals[0:4] = np.array([np.nan], dtype="<f4").tobytes()
    t.values = bytes(vals)
    _fails(msg, "NaN or Inf")
    msg = pb.SparseModel()
    msg.ParseFromString(encode(m, "int8"))
    t = next(t for t in msg.tensors if t.count)
    t.int8_scale = float("inf")
    _fails(msg, "scale")


def test_rejects_truncated_garbage_and_oversized():
    data = encode(random_sparse(500))
    for cut in (1, 7, len(data) // 2, len(data) - 1):
        with pytest.raises(WireFormatError):
            decode(data[:cut])
    with pytest.raises(WireFormatError):
        decode(b"\xff" * 64)
    with pytest.raises(PayloadTooLargeError, match="exceeds the limit"):
        decode(data, max_bytes=len(data) - 1)
    with pytest.raises(WireFormatError, match="expected bytes"):
        decode("text")  # type: ignore[arg-type]


def test_rejects_trailing_bits_in_position_streams():
    msg = _msg(random_sparse(50))
    t = next(t for t in msg.tensors if t.count)
    t.rice_quotients = t.rice_quotients + b"\x00"
    _fails(msg, "trailing")
    msg = _msg(random_sparse(50))
    t = next(t for t in msg.tensors if t.count and t.rice_parameter)
    t.rice_remainders = t.rice_remainders + b"\x00"
    _fails(msg, "remainder")


def test_invalid_model_is_not_encoded():
    m = random_sparse(20)
    t = m.tensors[0]
    dup = SparseTensor(t.name, t.shape, np.array([1, 1]), np.array([0.5, 0.5], np.float32))
    with pytest.raises(WireFormatError, match="strictly increasing"):
        encode(SparseModel(m.seed, m.model_id, (dup, *m.tensors[1:])))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=400))
def test_fuzz_random_bytes_never_crash(data):
    try:
        model = decode(data)
    except WireFormatError:
        return
    model.validate()


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_fuzz_mutated_payloads_fail_cleanly_or_stay_valid(data):
    precision = data.draw(st.sampled_from(["fp32", "fp16", "int8", "int4", "ternary"]))
    payload = bytearray(encode(random_sparse(60, seed=3), precision))
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(payload) - 1))
        payload[pos] = data.draw(st.integers(0, 255))
    try:
        model = decode(bytes(payload))
    except WireFormatError:
        return
    model.validate()
    for t in model.tensors:
        assert np.all(np.isfinite(t.values)) and (t.count == 0 or t.indices[-1] < t.numel)


@settings(max_examples=60, deadline=None)
@given(
    k=st.integers(0, 3000),
    seed=st.integers(0, 2**32),
    model_seed=st.integers(0, 2**64 - 1),
    precision=st.sampled_from(["fp32", "fp16", "int8", "int4", "ternary"]),
)
def test_property_round_trip(k, seed, model_seed, precision):
    m = random_sparse(k, seed=seed, model_seed=model_seed)
    data = encode(m, precision)
    back = decode(data)
    assert back.seed == model_seed and back.num_tracked == k
    assert encode(back, precision) == data


def _crafted(count: int, quot: bytes, rem: bytes = b"", b: int = 0) -> bytes:
    """A payload whose first tensor declares `count` fp32 values with the given position streams."""
    msg = _msg(random_sparse(0))
    t = msg.tensors[0]
    t.count, t.rice_parameter, t.rice_quotients, t.rice_remainders = count, b, quot, rem
    t.value_encoding, t.values = pb.VALUE_ENCODING_FP32, bytes(4 * count)
    return msg.SerializeToString()


LIMIT = 16 * 1024 * 1024
FIRST = math.prod(next(iter(SHAPES.values())))  # 78,400 weights


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(_crafted(FIRST, bytes(LIMIT - 400_000)), id="all-zero quotients"),
        pytest.param(_crafted(FIRST, b"\xff" * (LIMIT - 400_000)), id="no terminators"),
        pytest.param(_crafted(FIRST, bytes(2 * FIRST // 8)), id="too many terminators"),
        pytest.param(
            _crafted(FIRST, bytes(FIRST // 8), b"\xff" * (LIMIT - 400_000), 31), id="long remainders"
        ),
        pytest.param(
            _crafted(50_000, bytes(50_000 // 8), b"\xff" * (50_000 * 31 // 8 + 1), 31), id="big gaps"
        ),
        pytest.param(encode(random_sparse(N), "int8"), id="largest valid"),
        pytest.param(encode(random_sparse(N, scale=0.0), "int4"), id="one bit per value"),
    ],
)
def test_decode_memory_is_bounded_by_the_payload(payload):
    """Crafted streams are refused from their lengths before anything unpacks; a decode allocates
    at most ~2x its input plus ~32 bytes per declared entry (the decoded model itself is 12),
    and every entry carries at least one bit."""
    import tracemalloc

    msg = pb.SparseModel()
    msg.ParseFromString(payload)
    entries = sum(t.count for t in msg.tensors)
    assert entries <= 8 * len(payload)
    tracemalloc.start()
    try:
        decode(payload, max_bytes=LIMIT)
    except WireFormatError:
        pass
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert peak <= 2 * len(payload) + 40 * entries + (1 << 20), (peak, len(payload), entries)
