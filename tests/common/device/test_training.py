"""DropBack learns Fashion-MNIST for real (one epoch, a quarter of the data)."""

import numpy as np
import torch

from dropfleet.common.device.dropback import DropBack, sparse_from_optimizer
from dropfleet.common.device.train import evaluate, train_epochs
from dropfleet.common.model.torch_model import materialize, seeded_model
from dropfleet.common.wire.codec import decode, encode


def test_dropback_learns_and_survives_the_wire(fmnist_train, fmnist_test):
    data = fmnist_train.subset(np.arange(15000))
    model = seeded_model("mlp-90k", 0)
    k = 89_610 // 20
    opt = DropBack(model.parameters(), lr=0.1, k=k)
    train_epochs(model, opt, data, epochs=1, batch_size=64, seed=0)
    result = evaluate(model, fmnist_test)
    assert result.accuracy > 0.70
    sparse = sparse_from_optimizer(model, opt, 0, "mlp-90k")
    assert sparse.num_tracked == k
    received = materialize(decode(encode(sparse, "fp32")))
    assert abs(evaluate(received, fmnist_test).accuracy - result.accuracy) < 0.002
    untrained = evaluate(seeded_model("mlp-90k", 0), fmnist_test)
    assert untrained.accuracy < 0.3
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_batch_norm_statistics_are_rebuilt_after_the_wire(fmnist_train, fmnist_test):
    from dropfleet.common.device.train import recalibrate_batch_norm

    data = fmnist_train.subset(np.arange(6000))
    model = seeded_model("cnn-bn-prelu", 1)
    opt = DropBack(model.parameters(), lr=0.05, k=4000)
    train_epochs(model, opt, data, epochs=1, batch_size=64, seed=0)
    trained = evaluate(model, fmnist_test).accuracy
    received = materialize(decode(encode(sparse_from_optimizer(model, opt, 1, "cnn-bn-prelu"))))
    recalibrate_batch_norm(received, data)
    assert trained > 0.6
    assert abs(evaluate(received, fmnist_test).accuracy - trained) < 0.03
