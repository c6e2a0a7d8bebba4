"""Top-k with error feedback (the sparsified-FedAvg baseline): nothing is lost, only delayed."""

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord

from dropfleet.common.errors import WireFormatError
from dropfleet.common.model.layout import model_layout
from dropfleet.common.model.sparse import dense_deltas
from dropfleet.common.wire.topk import sparsify_with_feedback, zeros
from dropfleet.fleet.records import (
    TOPK_VERSION,
    pack_topk_model,
    pack_topk_update,
    unpack_topk_model,
    unpack_topk_update,
)


def random_update(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {n: rng.standard_normal(a.shape).astype(np.float32) * 0.01 for n, a in zeros("mlp-90k").items()}


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_sent_plus_residual_is_update_plus_old_residual(precision):
    residual = zeros("mlp-90k")
    for step in range(3):
        update = random_update(step)
        _, received, new_residual = sparsify_with_feedback(update, residual, 500, "mlp-90k", 0, precision)
        assert received.num_tracked == 500
        sent = dense_deltas(received)
        for name in update:
            np.testing.assert_allclose(
                sent[name] + new_residual[name], update[name] + residual[name], atol=1e-7
            )
        # The k entries sent are the largest of update + residual.
        acc = np.concatenate([(update[n] + residual[n]).ravel() for n in update])
        kept = np.concatenate([(sent[n] != 0).ravel() for n in update])
        assert np.abs(acc[kept]).min() >= np.abs(acc[~kept]).max()
        residual = new_residual


def test_update_records_are_checked():
    payload, _, _ = sparsify_with_feedback(random_update(0), zeros("mlp-90k"), 50, "mlp-90k", 0, "fp16")
    record = pack_topk_update(payload, 3)
    (model,), version = unpack_topk_update(record, 1 << 20)
    assert version == 3 and model.num_tracked == 50
    chain, version = unpack_topk_update(pack_topk_update(payload, 3, earlier=[payload, payload]), 1 << 20)
    assert version == 3 and len(chain) == 3
    with pytest.raises(WireFormatError, match="cannot lead to version 1"):
        unpack_topk_update(pack_topk_update(payload, 1, earlier=[payload, payload]), 1 << 20)
    record[TOPK_VERSION] = Array(np.array([-1], dtype=np.int64))
    with pytest.raises(WireFormatError, match="bad model version"):
        unpack_topk_update(record, 1 << 20)
    with pytest.raises(WireFormatError, match="expected arrays"):
        unpack_topk_update(ArrayRecord({"model": record["model"]}), 1 << 20)
    with pytest.raises(WireFormatError, match="expected arrays"):  # a gap in the chain
        gap = pack_topk_update(payload, 3, earlier=[payload, payload])
        del gap["earlier-0"]
        unpack_topk_update(gap, 1 << 20)


def test_whole_model_records_are_checked():
    shapes = model_layout("mlp-90k").shapes
    weights = {name: np.ones(shape, np.float32) for name, shape in shapes.items()}
    got, version = unpack_topk_model(pack_topk_model(weights, 4), shapes)
    assert version == 4 and all(np.array_equal(got[n], weights[n]) for n in shapes)
    bad, first = dict(weights), next(iter(shapes))
    bad[first] = np.full(shapes[first], np.nan, np.float32)
    with pytest.raises(WireFormatError, match="non-finite"):
        unpack_topk_model(pack_topk_model(bad, 4), shapes)
    bad[first] = np.ones((3, 3), np.float32)
    with pytest.raises(WireFormatError, match="is not float32"):
        unpack_topk_model(pack_topk_model(bad, 4), shapes)
    with pytest.raises(WireFormatError, match="expected the model's tensors"):
        unpack_topk_model(pack_topk_model({"x": np.ones(2, np.float32)}, 4), shapes)
