"""The lean training loops against torch's: the same epoch, evaluation and batch-norm recalibration."""

import numpy as np
import pytest
import torch

from dropfleet.common.device import train as torch_train
from dropfleet.common.device.data import load_fashion_mnist
from dropfleet.common.device.dropback import DropBack, sparse_from_optimizer
from dropfleet.common.device.lean.dropback import LeanDropBack
from dropfleet.common.device.lean.network import Network, seeded_network
from dropfleet.common.device.lean.train import epoch_order, evaluate, recalibrate_batch_norm, train_epochs
from dropfleet.common.model.registry import get_model_entry
from dropfleet.common.model.torch_model import seeded_model

SEED = 21


@pytest.fixture(scope="module")
def split():
    return load_fashion_mnist("train", indices=np.arange(5000, 5640))


@pytest.fixture(scope="module")
def data(split):
    return np.asarray(split.images), np.asarray(split.labels)


def test_the_epoch_order_is_fixed_by_seed_and_epoch():
    # Golden: every machine shuffles a device's examples alike (NumPy's PCG64, seeded by [seed, epoch]).
    assert epoch_order(10, 0, 0).tolist() == [4, 6, 2, 7, 3, 5, 9, 0, 8, 1]
    assert epoch_order(10, 0, 1).tolist() == [9, 1, 3, 8, 7, 6, 0, 4, 2, 5]
    assert sorted(epoch_order(1000, 3, 2)) == list(range(1000))


def test_an_epoch_trains_as_the_torch_loop_does_in_the_same_order(data):
    x, y = data
    model = seeded_model("mlp-90k", SEED)
    opt = DropBack(model.parameters(), lr=0.05, k=4000)
    total = 0.0
    order = epoch_order(len(y), SEED, 0)
    for start in range(0, len(y), 32):
        idx = order[start : start + 32]
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(torch.from_numpy(x[idx])), torch.from_numpy(y[idx]))
        loss.backward()
        opt.step()
        total += float(loss.detach())
    lean = LeanDropBack(seeded_network("mlp-90k", SEED), lr=0.05, k=4000)
    mean_loss = train_epochs(lean, x, y, epochs=1, batch_size=32, seed=SEED)
    assert mean_loss == pytest.approx(total / 20, rel=1e-5)
    want = sparse_from_optimizer(model, opt, SEED, "mlp-90k").flat_positions()
    np.testing.assert_array_equal(lean.to_sparse("mlp-90k", SEED).flat_positions(), want)


def test_evaluation_and_recalibration_agree_with_torch(split, data):
    x, y = data
    model = seeded_model("cnn-bn-prelu", SEED)
    flat = torch.cat([p.detach().flatten() for p in model.parameters()]).numpy().copy()
    lean = LeanDropBack(Network(get_model_entry("cnn-bn-prelu").arch, flat), lr=0.1, k=10)
    torch_train.recalibrate_batch_norm(model, split, batches=3, batch_size=64)
    recalibrate_batch_norm(lean, x, batches=3, batch_size=64)
    for name, value in model.state_dict().items():
        if "running" in name:
            np.testing.assert_allclose(lean.buffers[name], value.numpy(), rtol=1e-4, atol=1e-6)
    assert lean.bn_momentum == 0.1  # restored after recalibration
    want = torch_train.evaluate(model, split, batch_size=200)
    got = evaluate(lean, x, y, batch_size=200)
    assert got.examples == want.examples == len(y)
    assert got.accuracy == pytest.approx(want.accuracy, abs=2 / len(y))  # at most a near-tie apart
    assert got.loss == pytest.approx(want.loss, rel=1e-4)
