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

from dropfleet.common.model.layout import model_layout
from dropfleet.common.model.sparse import SparseModel, dense_deltas, sparse_from_dense_delta
from dropfleet.common.wire.codec import decode, encode

Dense = dict[str, np.ndarray]


def zeros(model_id: str) -> Dense:
    return {name: np.zeros(shape, np.float32) for name, shape in model_layout(model_id).shapes.items()}


def sparsify_with_feedback(
    update: Dense, residual: Dense, k: int, model_id: str, seed: int, precision: str
) -> tuple[bytes, SparseModel, Dense]:
    """Encode the top-k of update + residual; returns (wire bytes, what the receiver decodes, new residual).

    The residual keeps everything not received, quantization error included.
    """
    layout = model_layout(model_id)
    acc = {t.name: update[t.name] + residual[t.name] for t in layout.tensors}
    flat = np.concatenate([a.reshape(-1) for a in acc.values()])
    keep = np.zeros(flat.size, bool)
    if k < flat.size:
        keep[np.argpartition(-np.abs(flat), k - 1)[:k]] = True
    else:
        keep[:] = True
    chosen = {
        t.name: np.where(keep[t.offset : t.end].reshape(t.shape), acc[t.name], np.float32(0))
        for t in layout.tensors
    }
    payload = encode(sparse_from_dense_delta(model_id, seed, chosen), precision)
    received = decode(payload)
    got = dense_deltas(received)
    return payload, received, {name: acc[name] - got[name] for name in acc}
