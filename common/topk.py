"""Top-k sparsification with error feedback: the sparsified-FedAvg baseline.

Not DropBack: the model itself stays dense on both ends; only the updates are
sparse. Each sender adds the error it did not send last time (the residual) to
its new update, sends the k entries largest in magnitude, and keeps the rest
as the next residual (Stich et al. 2018; Sattler et al.'s STC does this in
both directions). The sparse update travels as a `SparseModel` whose values
are update entries, in the same wire format as DropBack, so bytes compare
like for like.
"""

import numpy as np

from dropfleet.common.codec import decode, encode
from dropfleet.common.sparse import SparseModel, dense_deltas, parameter_shapes, sparse_from_dense_delta

Dense = dict[str, np.ndarray]


def zeros(model_id: str) -> Dense:
    return {name: np.zeros(shape, np.float32) for name, shape in parameter_shapes(model_id).items()}


def sparsify_with_feedback(
    update: Dense, residual: Dense, k: int, model_id: str, seed: int, precision: str
) -> tuple[bytes, SparseModel, Dense]:
    """Encode the top-k of update + residual; returns (wire bytes, what the receiver decodes, new residual).

    The residual keeps everything not received, quantization error included.
    """
    acc = {name: update[name] + residual[name] for name in update}
    flat = np.concatenate([a.reshape(-1) for a in acc.values()])
    keep = np.zeros(flat.size, bool)
    if k < flat.size:
        keep[np.argpartition(-np.abs(flat), k - 1)[:k]] = True
    else:
        keep[:] = True
    chosen, start = {}, 0
    for name, a in acc.items():
        mask = keep[start : start + a.size].reshape(a.shape)
        chosen[name] = np.where(mask, a, np.float32(0))
        start += a.size
    payload = encode(sparse_from_dense_delta(model_id, seed, chosen), precision)
    received = decode(payload)
    got = dense_deltas(received)
    return payload, received, {name: acc[name] - got[name] for name in acc}
