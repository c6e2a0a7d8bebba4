"""Model registry and sparse-model helpers."""

import numpy as np
import pytest
import torch

from dropfleet.common.device.dropback import DropBack, sparse_from_optimizer
from dropfleet.common.errors import UnknownModelError, WireFormatError
from dropfleet.common.model.registry import MODELS
from dropfleet.common.model.sparse import SparseModel, dense_deltas, initial_at_tracked
from dropfleet.common.model.torch_model import build_model, materialize


@pytest.mark.parametrize(
    ("model_id", "n"), [("mlp-90k", 89_610), ("lenet-300-100", 266_610), ("cnn-bn-prelu", 20_634)]
)
def test_parameter_counts(model_id, n):
    assert sum(p.numel() for p in build_model(model_id).parameters()) == n
    assert f"{n:,}" in MODELS[model_id].description


def test_unknown_model_names_known_ids():
    with pytest.raises(UnknownModelError, match="mlp-90k"):
        build_model("vgg")


def test_empty_sparse_model_is_the_seeded_init():
    sparse = SparseModel.empty("cnn-bn-prelu", 11)
    sparse.validate()
    assert sparse.num_tracked == 0
    model = materialize(sparse)
    assert bool((model[1].weight == 1).all())


def test_optimizer_to_sparse_and_back_reproduces_the_model():
    from dropfleet.common.model.torch_model import seeded_model

    model = seeded_model("mlp-90k", 5)
    opt = DropBack(model.parameters(), lr=0.1, k=300)
    x, y = torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,))
    for _ in range(3):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    sparse = sparse_from_optimizer(model, opt, 5, "mlp-90k")
    assert sparse.num_tracked == 300
    rebuilt = materialize(sparse)
    for p, q in zip(model.parameters(), rebuilt.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-7)
    # w0 at tracked positions, regenerated for those entries only, restores the optimizer
    opt2 = DropBack(rebuilt.parameters(), lr=0.1, k=300)
    opt2.set_tracked(initial_at_tracked(sparse))
    deltas = dense_deltas(sparse)
    for (idx, delta), t in zip(opt2.tracked(), sparse.tensors, strict=True):
        assert np.array_equal(idx, t.indices)
        np.testing.assert_allclose(delta, deltas[t.name].reshape(-1)[idx], atol=1e-7)


def test_optimizer_must_match_model():
    model = build_model("mlp-90k")
    opt = DropBack(list(model.parameters())[::-1], lr=0.1, k=3)
    with pytest.raises(WireFormatError, match="in order"):
        sparse_from_optimizer(model, opt, 0, "mlp-90k")
