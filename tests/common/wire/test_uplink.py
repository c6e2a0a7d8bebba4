"""Change-coded uplink: what the server resolves is what the device meant, less what feedback keeps."""

import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dropfleet.common.aggregate.merge import combine
from dropfleet.common.errors import ConfigError, WireFormatError
from dropfleet.common.model.sparse import from_positions
from dropfleet.common.wire.codec import HeldSet, decode, encode, read_rice_set, rice_set
from dropfleet.common.wire.uplink import NO_RESIDUAL, encode_change, resolve, values_at
from dropfleet.proto import sparse_model_pb2 as pb
from tests.factories import random_sparse_model

N = 89_610


def flat(model):
    return model.flat_positions(), np.concatenate([t.values for t in model.tensors])


def dense(model):
    out = np.zeros(N, np.float64)
    positions, values = flat(model)
    out[positions] = values
    return out


def near_global(update, seed, overlap=0.7, jitter=0.002):
    """A global that shares most of the device's positions, with nearby values (as after a round)."""
    rng = np.random.default_rng(seed)
    positions, values = flat(update)
    keep = rng.random(positions.size) < overlap
    extra = rng.choice(N, 300, replace=False)
    pos = np.union1d(positions[keep], extra)
    vals = values_at(positions, values, pos) + rng.normal(0, jitter, pos.size).astype(np.float32)
    vals[vals == 0] = 0.001
    return from_positions(update, pos, vals)


@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8", "int4"])
def test_the_server_resolves_deltas_within_the_quantization_of_the_change(precision):
    update = random_sparse_model(3000, 1, scale=0.05)
    sent = near_global(update, 2)
    payload, residual = encode_change(update, sent, 7, precision)
    reply = decode(payload, held=HeldSet(7, sent))
    assert reply.base_version == 7 and np.array_equal(reply.flat_positions(), update.flat_positions())
    got = resolve(reply, sent, 7)
    assert got.base_version == 0
    # Exactly: resolved = intended - residual (the feedback holds the rest).
    positions, intended = flat(update)
    assert np.array_equal(residual[0], positions)
    np.testing.assert_allclose(flat(got)[1], intended - residual[1], rtol=1e-5, atol=1e-7)
    change = np.abs(intended - values_at(*flat(sent), positions))
    assert np.abs(residual[1]).max() <= {"fp32": 1e-6, "fp16": 1e-3, "int8": 0.01, "int4": 0.1}[
        precision
    ] * max(change.max(), 1e-6)


def test_change_coding_at_int4_beats_delta_coding_at_int4():
    update = random_sparse_model(3000, 3, scale=0.05)
    sent = near_global(update, 4, overlap=1.0)  # a device that kept the global's positions
    want = dense(update)
    as_delta = dense(decode(encode(update, "int4")))
    as_change = dense(
        resolve(decode(encode_change(update, sent, 1, "int4")[0], held=HeldSet(1, sent)), sent, 1)
    )
    assert np.abs(as_change - want).max() * 5 < np.abs(as_delta - want).max()


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    rounds=st.integers(1, 6),
    precision=st.sampled_from(["int8", "int4", "ternary"]),
)
def test_feedback_telescopes_what_arrived_plus_the_residual_is_what_was_meant(seed, rounds, precision):
    rng = np.random.default_rng(seed)
    base = random_sparse_model(500, seed, scale=0.05)
    positions = base.flat_positions()
    residual, arrived_sum, meant_sum = NO_RESIDUAL, np.zeros(positions.size), np.zeros(positions.size)
    sent = near_global(base, seed + 1)
    for r in range(1, rounds + 1):
        values = (flat(base)[1] + rng.normal(0, 0.01, positions.size)).astype(np.float32)
        update = from_positions(base, positions, values)
        payload, residual = encode_change(update, sent, r, precision, residual)
        arrived_sum += flat(decode(payload, held=HeldSet(r, sent)))[1]
        meant_sum += values - values_at(*flat(sent), positions)
    np.testing.assert_allclose(arrived_sum + residual[1], meant_sum, atol=1e-5)


def test_a_stale_or_unexpected_base_version_is_refused():
    update = random_sparse_model(200, 5)
    sent = near_global(update, 6)
    payload = encode_change(update, sent, 4, "fp16")[0]
    with pytest.raises(WireFormatError, match="coded against global version 4; the reader holds version 5"):
        decode(payload, held=HeldSet(5, sent))
    with pytest.raises(WireFormatError, match="the reader holds no global set"):
        decode(payload)
    reply = decode(payload, held=HeldSet(4, sent))
    with pytest.raises(
        WireFormatError, match="changes against global version 4, but this round sent version 5"
    ):
        resolve(reply, sent, 5)
    assert resolve(update, sent, 5) is update  # deltas pass through
    with pytest.raises(WireFormatError, match="resolve it"):
        combine([(reply, 1.0)])
    with pytest.raises(ConfigError, match="versions start at 1"):
        encode_change(update, sent, 0, "fp16")


def test_the_format_version_says_whether_values_are_changes():
    update = random_sparse_model(50, 7)
    msg = pb.SparseModel()
    msg.ParseFromString(encode(dataclasses.replace(update, base_version=3), "fp16"))
    assert (msg.format_version, msg.base_version) == (2, 3)
    msg.format_version = 1  # a version-1 reader would take the changes for deltas
    with pytest.raises(WireFormatError, match="base version"):
        decode(msg.SerializeToString())
    msg.ParseFromString(encode(update, "fp16"))
    assert (msg.format_version, msg.base_version) == (1, 0)
    msg.format_version = 2
    with pytest.raises(WireFormatError, match="base version"):
        decode(msg.SerializeToString())


def _base_set_tensor(msg: pb.SparseModel) -> pb.SparseTensor:
    return next(t for t in msg.tensors if t.position_coding == pb.POSITION_CODING_BASE_SET)


def test_positions_go_against_the_held_set_and_cost_a_fraction():
    """A device that trained from the global set tracks all of it plus a few of its own: the reply
    names only what it added, and the server rebuilds the very positions."""
    sent = random_sparse_model(3000, 8, scale=0.05)
    positions = sent.flat_positions()
    added = np.setdiff1d(np.random.default_rng(9).choice(N, 400, replace=False), positions)
    mine = np.union1d(positions, added)
    update = from_positions(sent, mine, values_at(*flat(sent), mine) + np.float32(0.01))
    payload, _ = encode_change(update, sent, 3, "int4")
    msg = pb.SparseModel()
    msg.ParseFromString(payload)
    coded = [t for t in msg.tensors if t.count > 50]
    assert coded and all(t.position_coding == pb.POSITION_CODING_BASE_SET for t in coded)
    assert sum(t.base_removed.count for t in msg.tensors) == 0
    assert sum(t.base_added.count for t in msg.tensors) == added.size
    reply = decode(payload, held=HeldSet(3, sent))
    assert np.array_equal(reply.flat_positions(), mine)
    against_held = sum(t.base_removed.ByteSize() + t.base_added.ByteSize() for t in msg.tensors)
    msg.ParseFromString(encode(dataclasses.replace(reply, base_version=3), "int4"))  # no held set
    over_tensor = sum(len(t.rice_quotients) + len(t.rice_remainders) for t in msg.tensors)
    assert against_held * 4 < over_tensor


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**16), keep=st.floats(0.0, 1.0), extra=st.integers(0, 2000))
def test_any_overlap_with_the_held_set_round_trips_exactly(seed, keep, extra):
    rng = np.random.default_rng(seed)
    sent = random_sparse_model(int(rng.integers(0, 3000)), seed, scale=0.05)
    held = sent.flat_positions()
    mine = np.union1d(held[rng.random(held.size) < keep], rng.choice(N, extra, replace=False))
    update = from_positions(sent, mine, rng.normal(0, 0.05, mine.size).astype(np.float32) + 1e-3)
    payload, _ = encode_change(update, sent, 2, "int8")
    reply = decode(payload, held=HeldSet(2, sent))
    assert np.array_equal(reply.flat_positions(), mine)
    assert encode(reply, "int8", HeldSet(2, sent)) == payload


def test_hostile_base_set_positions_are_refused():
    sent = random_sparse_model(3000, 10, scale=0.05)
    positions = sent.flat_positions()
    mine = np.union1d(positions[5:], np.setdiff1d(np.arange(0, N, 97), positions))
    update = from_positions(sent, mine, values_at(*flat(sent), mine) + np.float32(0.01))
    payload, _ = encode_change(update, sent, 4, "int4")
    held = HeldSet(4, sent)

    def fails(corrupt, needle):
        msg = pb.SparseModel()
        msg.ParseFromString(payload)
        corrupt(msg, _base_set_tensor(msg))
        with pytest.raises(WireFormatError, match=needle):
            decode(msg.SerializeToString(), held=held)

    def base_ordinal_out_of_range(msg, t):
        size = sent.tensors[list(msg.tensors).index(t)].count
        t.base_removed.CopyFrom(rice_set(np.array([size + 3])))

    def added_already_held(msg, t):
        mine_t = sent.tensors[list(msg.tensors).index(t)].indices
        t.base_added.CopyFrom(rice_set(np.union1d(read_rice_set("x", t.base_added, N), mine_t[:1])))

    fails(base_ordinal_out_of_range, "out of range")
    fails(added_already_held, "already in the base set")
    fails(lambda m, t: setattr(t, "count", t.count + 1), "positions for a count")
    fails(lambda m, t: setattr(t, "rice_quotients", b"\x00"), "Rice gap fields")
    fails(lambda m, t: setattr(t, "position_coding", 9), "unknown position coding")
    fails(lambda m, t: (setattr(m, "base_version", 0), setattr(m, "format_version", 1)), "no base version")
    msg = pb.SparseModel()
    msg.ParseFromString(payload)
    plain = next(t for t in msg.tensors if t.position_coding == pb.POSITION_CODING_RICE_SPLIT and t.count)
    plain.base_added.CopyFrom(rice_set(np.array([1])))
    with pytest.raises(WireFormatError, match="base-set fields"):
        decode(msg.SerializeToString(), held=held)
