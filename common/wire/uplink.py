"""Change-coded uplink with error feedback kept on the tracked entries.

A device that was sent the global tracked set G (version v) and trained its
own tracked set T with deltas d = w - w0 can send, instead of d, the change

    c = d - G(at T's positions, 0 where G has no entry) + r

quantized at the uplink precision (changes are small next to the deltas, so
few bits lose little), with `base_version = v` so the server knows what c is
against (`resolve`), and T's positions coded against G's (a device that
trained from G tracks most of it: what it dropped and added is short). r is
what earlier rounds' quantization left unsent; the new r is c minus what
the server will decode, kept only at T's positions: O(k) on the device,
never a dense residual. Telescoping, everything a device
meant to send either arrived or is still in r.
"""

import dataclasses

import numpy as np

from dropfleet.common.errors import ConfigError, WireFormatError
from dropfleet.common.model.sparse import SparseModel, from_positions
from dropfleet.common.wire.codec import HeldSet, decode, encode

# Sorted global flat positions and float32 values: the unsent quantization error.
Residual = tuple[np.ndarray, np.ndarray]
NO_RESIDUAL: Residual = (np.zeros(0, np.int64), np.zeros(0, np.float32))


def values_at(positions: np.ndarray, values: np.ndarray, at: np.ndarray) -> np.ndarray:
    """The values of sorted `positions` at sorted positions `at` (0 where absent), float32."""
    out = np.zeros(at.size, np.float32)
    if positions.size == 0 or at.size == 0:
        return out
    where = np.minimum(np.searchsorted(positions, at), positions.size - 1)
    hit = positions[where] == at
    out[hit] = values[where[hit]]
    return out


def encode_change(
    update: SparseModel,
    sent: SparseModel,
    version: int,
    precision: str,
    residual: Residual = NO_RESIDUAL,
) -> tuple[bytes, Residual]:
    """The wire bytes of `update` as changes against `sent` (global `version`), and the new residual."""
    if version < 1:
        raise ConfigError(f"global versions start at 1, got {version} (no server round in the message?)")
    positions, deltas = update.flat_positions(), update.flat_values()
    change = deltas - _at(sent, positions) + values_at(*residual, positions)
    model = dataclasses.replace(from_positions(update, positions, change), base_version=version)
    held = HeldSet(version, sent)
    payload = encode(model, precision, held)
    arrived = decode(payload, held=held).flat_values()
    return payload, (positions, (change - arrived).astype(np.float32))


def resolve(reply: SparseModel, sent: SparseModel, version: int) -> SparseModel:
    """Deltas (base version 0) from a reply: change-coded ones must be against `sent`, version `version`."""
    if reply.base_version == 0:
        return reply
    if reply.base_version != version:
        raise WireFormatError(
            f"values are changes against global version {reply.base_version}, "
            f"but this round sent version {version}"
        )
    positions = reply.flat_positions()
    return from_positions(reply, positions, reply.flat_values() + _at(sent, positions))


def _at(model: SparseModel, positions: np.ndarray) -> np.ndarray:
    return values_at(model.flat_positions(), model.flat_values(), positions)
