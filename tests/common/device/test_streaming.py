"""Streaming DropBack: the same training as the ordinary optimizer, without dense weights."""

import numpy as np
import pytest
import torch

from dropfleet.common.device.dropback import DropBack, sparse_from_optimizer
from dropfleet.common.device.streaming import StreamingDropBack
from dropfleet.common.device.streaming_core import STREAMING_STATE_BYTES_PER_TRACKED
from dropfleet.common.device.train import evaluate, train_epochs
from dropfleet.common.errors import ConfigError
from dropfleet.common.model.sparse import initial_at_tracked
from dropfleet.common.model.torch_model import load_deltas_, materialize, seeded_model
from tests.factories import random_sparse_model

N = 89_610
K = N // 20


def ordinary(data, k=K, start=None, freeze_after=None, epochs=1):
    model = seeded_model("mlp-90k", 0)
    if start is not None:
        load_deltas_(model, start)
    opt = DropBack(model.parameters(), lr=0.1, k=k, freeze_after=freeze_after)
    if start is not None:
        opt.set_tracked(initial_at_tracked(start))
    train_epochs(model, opt, data, epochs, 32, seed=5)
    return sparse_from_optimizer(model, opt, 0, "mlp-90k")


def streamed(data, k=K, start=None, freeze_after=None, epochs=1):
    trainer = StreamingDropBack("mlp-90k", 0, k, 0.1, freeze_after=freeze_after)
    if start is not None:
        trainer.load(start)
    train_epochs(trainer, trainer, data, epochs, 32, seed=5)
    return trainer, trainer.to_sparse()


def assert_identical(a, b):
    for x, y in zip(a.tensors, b.tensors, strict=True):
        assert np.array_equal(x.indices, y.indices), x.name
        assert np.array_equal(x.values, y.values), x.name  # bit for bit


def test_streaming_matches_the_ordinary_optimizer_bit_for_bit(fmnist_train):
    data = fmnist_train.subset(np.arange(1600))  # 50 steps
    trainer, got = streamed(data)
    assert got.num_tracked == K
    assert_identical(ordinary(data), got)
    assert trainer.state_bytes() == STREAMING_STATE_BYTES_PER_TRACKED * K


def test_streaming_from_a_global_model_larger_than_k_and_frozen(fmnist_train):
    data = fmnist_train.subset(np.arange(640))
    start = random_sparse_model(3 * K, seed=4)  # trimmed to the k farthest from w0, as DropBack does
    assert_identical(
        ordinary(data, start=start, freeze_after=8), streamed(data, start=start, freeze_after=8)[1]
    )


def test_no_dense_tensor_survives_a_step(fmnist_train):
    trainer, _ = streamed(fmnist_train.subset(np.arange(320)))
    persistent = [v for v in vars(trainer).values() if isinstance(v, torch.Tensor)]
    assert sum(t.numel() for t in persistent) <= 2 * K  # indices + values (+ the empty anchor)
    assert trainer.num_tracked == K


def test_evaluation_equals_the_materialized_model(fmnist_train, fmnist_test):
    trainer, sparse = streamed(fmnist_train.subset(np.arange(640)))
    test = fmnist_test.subset(np.arange(2000))
    got, want = evaluate(trainer, test), evaluate(materialize(sparse), test)
    # The trainer holds w itself; the wire form holds w - w0, so w0 + delta may differ in the last bit.
    assert got.accuracy == want.accuracy and got.loss == pytest.approx(want.loss, rel=1e-6)


def test_conv_batch_norm_prelu_stream_layer_by_layer_bit_for_bit(fmnist_train, fmnist_test):
    """Every registered model streams: the CNN's conv, batch-norm and PReLU weights included."""
    data, k = fmnist_train.subset(np.arange(640)), 20_634 // 10
    model = seeded_model("cnn-bn-prelu", 0)
    opt = DropBack(model.parameters(), lr=0.1, k=k)
    train_epochs(model, opt, data, 1, 32, seed=5)
    trainer = StreamingDropBack("cnn-bn-prelu", 0, k, 0.1)
    train_epochs(trainer, trainer, data, 1, 32, seed=5)
    assert_identical(sparse_from_optimizer(model, opt, 0, "cnn-bn-prelu"), trainer.to_sparse())
    assert {t.name for t in trainer.to_sparse().tensors if t.count} >= {"1.weight", "5.bias"}  # BN pruned too
    # Batch-norm running statistics moved once per step, as without streaming.
    assert all(torch.equal(a, b) for a, b in zip(model.buffers(), trainer._net.buffers(), strict=True))
    assert all(p.device.type == "meta" for p in trainer._net.parameters())  # no dense weights held
    test = fmnist_test.subset(np.arange(1000))
    assert evaluate(trainer, test).accuracy == evaluate(model, test).accuracy


def test_refusals():
    with pytest.raises(ConfigError, match="row blocks need a Linear/ReLU model"):
        StreamingDropBack("cnn-bn-prelu", 0, 100, 0.1, block_weights=2048)
    with pytest.raises(ConfigError, match="k"):
        StreamingDropBack("mlp-90k", 0, 0, 0.1)
    trainer = StreamingDropBack("mlp-90k", 0, 100, 0.1)
    with pytest.raises(ConfigError, match="seed 1"):
        trainer.load(random_sparse_model(10, model_seed=1))
    with pytest.raises(ConfigError, match="zero_grad"):
        trainer.step()


def test_row_blocks_bound_the_materialized_weights_and_agree_to_rounding(fmnist_train, fmnist_test):
    data = fmnist_train.subset(np.arange(3200))
    whole, _ = streamed(data)
    blocked = StreamingDropBack("mlp-90k", 0, K, 0.1, block_weights=4096)
    assert max(r1 - r0 for r0, r1 in blocked._row_blocks(blocked._layers[0][0])) * 784 <= 4096
    train_epochs(blocked, blocked, data, 1, 32, seed=5)
    same = np.intersect1d(whole._index.numpy(), blocked._index.numpy()).size
    assert same >= 0.95 * K  # block sums round differently; the selection barely moves
    test = fmnist_test.subset(np.arange(5000))
    assert abs(evaluate(whole, test).accuracy - evaluate(blocked, test).accuracy) <= 0.005
