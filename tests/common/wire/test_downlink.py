"""The versioned delta downlink: quantized versions, exact catch-up from any held version, hostile deltas."""

import hashlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dropfleet.common.errors import ConfigError, OutOfSyncError, PayloadTooLargeError, WireFormatError
from dropfleet.common.model.sparse import SparseModel, from_positions
from dropfleet.common.wire.downlink import (
    DELTA_LEVELS,
    MAX_UNITS,
    DownlinkPublisher,
    GlobalSet,
    apply_delta,
    encode_delta,
    quantize_toward,
)
from dropfleet.proto import sparse_model_pb2 as pb
from tests.factories import N_MLP, random_sparse_model

GRID = -10


def target(seed: int, k: int = 3000, scale: float = 0.05) -> SparseModel:
    return random_sparse_model(k, seed=seed, scale=scale)


def drift(model: SparseModel, seed: int, churn: float = 0.1, step: float = 0.01) -> SparseModel:
    """The next round's target: the same set with `churn` of it swapped, values moved by ~`step`."""
    rng = np.random.default_rng(seed)
    pos, val = model.flat_positions(), model.flat_values().astype(np.float64)
    val = val + rng.normal(0, step, pos.size)
    swap = rng.random(pos.size) < churn
    fresh = rng.choice(np.setdiff1d(np.arange(N_MLP), pos), int(swap.sum()), replace=False)
    pos = np.concatenate([pos[~swap], fresh])
    val = np.concatenate([val[~swap], rng.normal(0, 0.05, fresh.size)])
    order = np.argsort(pos)
    return from_positions(model, pos[order], val[order])


def same(a: GlobalSet, b: GlobalSet) -> bool:
    return (
        a.version == b.version
        and np.array_equal(a.positions, b.positions)
        and np.array_equal(a.units, b.units)
        and a.digest() == b.digest()
    )


def test_a_version_is_one_quantized_step_per_tensor_against_a_dense_reference():
    previous = GlobalSet.on_grid(target(1), 1, GRID)
    aim = drift(target(1), 2)
    new = quantize_toward(previous, aim, 2, "int4")
    assert np.array_equal(new.positions, aim.flat_positions())
    # Dense reference: per tensor, the change in grid units, its power-of-two step, the rounding.
    held = np.zeros(N_MLP)
    held[previous.positions] = previous.units
    want = np.zeros(N_MLP)
    want[aim.flat_positions()] = aim.flat_values().astype(np.float64) * 2.0**-GRID
    got = np.zeros(N_MLP)
    got[new.positions] = new.units
    was_held = np.isin(np.arange(N_MLP), previous.positions)
    in_new = np.isin(np.arange(N_MLP), new.positions)
    groups = 0
    for slot in previous.layout.tensors:
        for kept in (True, False):  # kept entries and new ones each have their own step
            on = np.zeros(N_MLP, bool)
            on[slot.offset : slot.end] = True
            on &= in_new & (was_held == kept)
            if not on.any():
                continue
            groups += 1
            change = want[on] - held[on]
            step = 1.0
            while np.abs(change).max() / step > DELTA_LEVELS["int4"]:
                step *= 2
            moved = got[on] - held[on]
            assert np.all(np.fmod(moved, step) == 0) and np.abs(moved).max() <= 7 * step
            assert np.abs(moved - change).max() <= step / 2
    assert groups >= 8
    np.testing.assert_array_equal(new.values(), (new.units * 2.0**GRID).astype(np.float32))


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_the_publisher_feeds_back_what_a_version_left_undelivered(precision):
    pub = DownlinkPublisher(GlobalSet.empty("mlp-90k", 0, GRID, version=1), precision)
    aim = target(3)
    carried = np.zeros(N_MLP)
    for version in range(2, 8):
        aim = drift(aim, version)
        intended = np.zeros(N_MLP)
        intended[aim.flat_positions()] = aim.flat_values()
        intended[aim.flat_positions()] += carried[aim.flat_positions()]
        new = pub.publish(aim, version)
        delivered = np.zeros(N_MLP)
        delivered[new.positions] = new.values()
        residual = np.zeros(N_MLP)
        residual[pub.residual[0]] = pub.residual[1]
        np.testing.assert_allclose(delivered + residual, intended, atol=1e-6)  # telescoping
        carried = residual
    # after a few versions the published set sits within a fraction of a step of the target
    assert np.abs(pub.current.values() - aim.flat_values()).max() < 0.02


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    present=st.lists(st.booleans(), min_size=3, max_size=14),
    keep=st.integers(2, 6),
    precision=st.sampled_from(["int8", "int4"]),
)
def test_a_device_that_missed_any_pattern_of_rounds_rebuilds_the_servers_set_exactly(
    seed, present, keep, precision
):
    pub = DownlinkPublisher(GlobalSet.empty("mlp-90k", 7, GRID, version=1), precision, keep=keep)
    aim, held = target(seed, k=800), None
    for version, here in enumerate(present, start=2):
        aim = drift(aim, seed + version, churn=0.2)
        pub.publish(aim, version)
        if here:
            held = apply_delta(held, pub.message_for(held.version if held else None))
            assert same(held, pub.current)
    # the server's set as a model: exactly the values the device trains from
    if present[-1]:
        assert held.to_sparse().flat_values().tobytes() == pub.current.to_sparse().flat_values().tobytes()


def test_the_smaller_of_the_change_and_the_whole_set_is_sent():
    pub = DownlinkPublisher(GlobalSet.empty("mlp-90k", 0, GRID, version=1), "int4", keep=4)
    aim = target(5, k=8000)
    for version in range(2, 9):
        aim = drift(aim, version, churn=0.02, step=0.002)
        pub.publish(aim, version)
    whole = pub.message_for(None)
    one_behind = pub.message_for(7)
    assert len(one_behind) * 2 < len(whole)  # a small change of a stable set
    assert pub.message_for(3) == whole  # no longer kept: the whole set
    assert pub.message_for(pub.current.version) == whole  # never a delta to itself
    assert same(apply_delta(None, whole), pub.current)


def test_republishing_a_kept_set_costs_a_few_bytes():
    pub = DownlinkPublisher(GlobalSet.empty("mlp-90k", 0, GRID, version=1), "int8")
    pub.publish(target(2), 2)
    held = apply_delta(None, pub.message_for(None))
    pub.republish(3)
    message = pub.message_for(2)
    assert len(message) < 200
    assert same(apply_delta(held, message), pub.current)


def test_a_message_whose_version_was_altered_fails_its_digest():
    """Found by the fuzz test below: the version number is part of what the digest covers."""
    pub = DownlinkPublisher(GlobalSet.empty("mlp-90k", 0, GRID, version=1), "int4")
    pub.publish(target(6, k=300), 2)
    held = apply_delta(None, pub.message_for(None))
    pub.publish(drift(target(6, k=300), 3, churn=0.3), 3)
    msg = _msg(pub.message_for(2))
    msg.version += 1
    with pytest.raises(OutOfSyncError, match="digest"):
        apply_delta(held, msg.SerializeToString())


def test_digest_and_bytes_are_pinned():
    """Golden values: the same set must hash and encode to the same bytes everywhere, forever."""
    positions = np.array([0, 5, 78_399, 78_400, 89_609], np.int64)
    units = np.array([1, -2, 300, -(2**23), 7], np.int64)
    g = GlobalSet("mlp-90k", 42, 3, GRID, positions, units)
    assert g.digest().hex() == "ef823b419e1753fd3939aee6dfa945f9"
    data = encode_delta(GlobalSet.empty("mlp-90k", 42, GRID), g)
    assert len(data) == 223
    assert (
        hashlib.sha256(data).hexdigest() == "a65e3f3da3c4117e7abbfd495e358bc18f59974f3280f60c27279bc1eddb6a6b"
    )
    assert g.values()[2] == np.float32(300 / 1024)
    # A set whose values cluster near 0 travels Rice coded (GridIntegers.rice).
    i = np.arange(200)
    units = np.where(i % 4 == 0, np.where(i % 8 == 0, 1, -1), 0)
    steady = GlobalSet("mlp-90k", 42, 4, GRID, i * 20, units)
    data = encode_delta(GlobalSet.empty("mlp-90k", 42, GRID), steady)
    assert _msg(data).tensors[0].values.rice
    assert (len(data), hashlib.sha256(data).hexdigest()) == (
        373,
        "3c42c15600eec50303412958d488b1cf5395ceb7b1da66586224e0b2fa619997",
    )


def _msg(data: bytes) -> pb.GlobalDelta:
    msg = pb.GlobalDelta()
    msg.ParseFromString(data)
    return msg


@pytest.fixture
def chain():
    """A device holding version 2 and a good delta to version 3."""
    pub = DownlinkPublisher(GlobalSet.empty("mlp-90k", 0, GRID, version=1), "int4")
    aim = target(4, k=2000)
    pub.publish(aim, 2)
    held = apply_delta(None, pub.message_for(None))
    pub.publish(drift(aim, 9, churn=0.2), 3)
    return held, pub.message_for(2), pub


def _first(msg: pb.GlobalDelta, field: str) -> pb.TensorDelta:
    return next(t for t in msg.tensors if getattr(t, field).count)


def _rice(msg: pb.GlobalDelta) -> pb.TensorDelta:
    return next(t for t in msg.tensors if t.changes.rice and t.changes.rice_parameter)


def test_small_changes_go_rice_coded(chain):
    """A version's changes are a step or two of a power of two: their Rice code beats a fixed width."""
    _, good, _ = chain
    coded = [t.changes for t in _msg(good).tensors if t.changes.data]
    assert coded and coded[0].rice and len(coded[0].data) + len(coded[0].remainders) > 0


@pytest.mark.parametrize(
    "corrupt, error, needle",
    [
        (lambda m: setattr(m, "base_version", 1), OutOfSyncError, "holds version 2"),
        (lambda m: setattr(m, "digest", bytes(16)), OutOfSyncError, "digest"),
        (lambda m: setattr(m, "digest", b"short"), WireFormatError, "digest of 5 bytes"),
        (lambda m: setattr(m, "format_version", 2), WireFormatError, "format version 2"),
        (lambda m: setattr(m, "version", 2), WireFormatError, "leads forward"),
        (lambda m: setattr(m, "grid_exponent", 3), WireFormatError, "grid exponent"),
        (lambda m: setattr(m, "grid_exponent", -11), OutOfSyncError, "grid"),
        (lambda m: setattr(m, "seed", 5), OutOfSyncError, "seed"),
        (lambda m: setattr(m, "model_id", "nope"), WireFormatError, "nope"),
        (lambda m: m.tensors.pop(), WireFormatError, "tensors"),
        (lambda m: setattr(m.tensors[0], "name", "fc9.weight"), WireFormatError, "does not match"),
        (lambda m: setattr(_first(m, "added").values, "data", b""), WireFormatError, "bytes (for|cannot)"),
        (lambda m: _rice(m).changes.MergeFrom(pb.GridIntegers(width=3)), WireFormatError, "fixed width"),
        (lambda m: setattr(_rice(m).changes, "rice", False), WireFormatError, "Rice fields"),
        (lambda m: setattr(_rice(m).changes, "rice_parameter", 33), WireFormatError, "rice parameter"),
        (lambda m: setattr(_rice(m).changes, "remainders", b""), WireFormatError, "remainder stream"),
        (lambda m: setattr(_first(m, "removed").changes, "width", 40), WireFormatError, "out of range"),
        # out-of-range positions: more removals than the base holds, additions past the tensor
        (lambda m: setattr(_first(m, "removed").removed, "count", 10**6), WireFormatError, "at most"),
        (lambda m: setattr(_first(m, "added").added, "quotients", b"\xff" * 4000), WireFormatError, "added"),
    ],
)
def test_hostile_deltas_are_refused_and_change_nothing(chain, corrupt, error, needle):
    held, good, _ = chain
    before = (held.positions.copy(), held.units.copy())
    msg = _msg(good)
    corrupt(msg)
    with pytest.raises(error, match=needle):
        apply_delta(held, msg.SerializeToString())
    assert np.array_equal(held.positions, before[0]) and np.array_equal(held.units, before[1])


def test_an_added_position_already_held_and_values_off_the_grid_are_refused(chain):
    held, _, pub = chain
    grown = GlobalSet(**{**pub.current.__dict__, "version": 3})
    # a crafted delta that re-adds a held position: build from an empty base, then relabel its base
    msg = _msg(encode_delta(GlobalSet.empty("mlp-90k", 0, GRID), grown))
    msg.base_version = 2
    with pytest.raises(WireFormatError, match="already in the base"):
        apply_delta(held, msg.SerializeToString())
    huge = GlobalSet(**{**held.__dict__, "version": 3, "units": held.units + (MAX_UNITS - 1)})
    with pytest.raises(WireFormatError, match="exact range"):
        apply_delta(held, encode_delta(held, huge))


def test_size_limits_and_garbage(chain):
    held, good, _ = chain
    with pytest.raises(PayloadTooLargeError):
        apply_delta(held, good, max_bytes=len(good) - 1)
    with pytest.raises(WireFormatError, match="malformed"):
        apply_delta(held, b"\xff\xff\xff")
    with pytest.raises(WireFormatError, match="expected bytes"):
        apply_delta(held, "text")  # type: ignore[arg-type]
    with pytest.raises(OutOfSyncError, match="holds nothing"):
        apply_delta(None, good)


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_fuzz_mutated_deltas_fail_cleanly_or_rebuild_a_valid_set(data):
    pub = DownlinkPublisher(GlobalSet.empty("mlp-90k", 0, GRID, version=1), "int4")
    aim = target(6, k=300)
    pub.publish(aim, 2)
    held = apply_delta(None, pub.message_for(None))
    pub.publish(drift(aim, 3, churn=0.3), 3)
    payload = bytearray(pub.message_for(2))
    for _ in range(data.draw(st.integers(1, 4))):
        payload[data.draw(st.integers(0, len(payload) - 1))] = data.draw(st.integers(0, 255))
    try:
        got = apply_delta(held, bytes(payload))
    except WireFormatError:  # OutOfSyncError is one
        return
    assert same(got, pub.current)  # a mutation that survives the digest changed nothing that matters


def test_publishing_backwards_or_at_another_precision_is_refused():
    pub = DownlinkPublisher(GlobalSet.empty("mlp-90k", 0, GRID, version=4), "int4")
    with pytest.raises(ConfigError, match="does not follow"):
        pub.publish(target(1), 4)
    with pytest.raises(ConfigError, match="int8"):
        DownlinkPublisher(GlobalSet.empty("mlp-90k", 0, GRID), "fp16")
