"""Change-coded uplink: what the server resolves is what the device meant, less what feedback keeps."""

import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dropfleet.common.codec import decode, encode
from dropfleet.common.errors import ConfigError, WireFormatError
from dropfleet.common.merge import combine, from_positions
from dropfleet.common.uplink import NO_RESIDUAL, encode_change, resolve, values_at
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
    reply = decode(payload)
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
    as_change = dense(resolve(decode(encode_change(update, sent, 1, "int4")[0]), sent, 1))
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
        arrived_sum += flat(decode(payload))[1]
        meant_sum += values - values_at(*flat(sent), positions)
    np.testing.assert_allclose(arrived_sum + residual[1], meant_sum, atol=1e-5)


def test_a_stale_or_unexpected_base_version_is_refused():
    update = random_sparse_model(200, 5)
    sent = near_global(update, 6)
    reply = decode(encode_change(update, sent, 4, "fp16")[0])
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
