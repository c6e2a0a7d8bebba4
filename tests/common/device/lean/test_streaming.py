"""Lean streaming DropBack against the torch streaming trainer, on real data."""

import numpy as np
import pytest
import torch

from dropfleet.common.device.data import load_fashion_mnist
from dropfleet.common.device.lean.streaming import LeanStreamingDropBack
from dropfleet.common.device.streaming import StreamingDropBack
from dropfleet.common.errors import ConfigError
from dropfleet.common.wire.codec import encode

SEED = 5


@pytest.fixture(scope="module")
def batches():
    split = load_fashion_mnist("train", indices=np.arange(2000, 2000 + 32 * 25))
    x, y = split.images.numpy(), split.labels.numpy()
    return [(x[i : i + 32], y[i : i + 32]) for i in range(0, len(x), 32)]


def torch_step(trainer, x, y) -> float:
    trainer.zero_grad()
    loss = torch.nn.functional.cross_entropy(trainer(torch.from_numpy(x)), torch.from_numpy(y))
    loss.backward()
    trainer.step()
    return float(loss.detach())


@pytest.mark.parametrize(
    "model_id, k, lr, blocks",
    [("mlp-90k", 3000, 0.05, None), ("mlp-90k", 3000, 0.05, 4096), ("cnn-bn-prelu", 1500, 0.02, None)],
)
def test_it_trains_as_the_torch_streaming_trainer_does(model_id, k, lr, blocks, batches):
    ours = LeanStreamingDropBack(model_id, SEED, k, lr, freeze_after=20, block_weights=blocks)
    theirs = StreamingDropBack(model_id, SEED, k, lr, freeze_after=20, block_weights=blocks)
    theirs.train()
    for x, y in batches:  # through the freeze at step 20
        assert ours.train_step(x, y) == pytest.approx(torch_step(theirs, x, y), rel=1e-4)
    got, want = ours.to_sparse(), theirs.to_sparse()
    np.testing.assert_array_equal(got.flat_positions(), want.flat_positions())
    values = [np.concatenate([t.values for t in m.tensors]) for m in (got, want)]
    np.testing.assert_allclose(values[0], values[1], rtol=0, atol=5e-3 * np.abs(values[1]).max())
    # Evaluation: the same logits from the same tracked set (batch norm on its running statistics).
    ours.training = False
    theirs.eval()
    x = batches[0][0]
    with torch.no_grad():
        np.testing.assert_allclose(ours.forward(x), theirs(torch.from_numpy(x)).numpy(), rtol=1e-3, atol=1e-3)


def test_a_loaded_model_continues_where_the_torch_trainer_would(batches):
    first = StreamingDropBack("mlp-90k", SEED, 2000, 0.05)
    for x, y in batches[:5]:
        torch_step(first, x, y)
    published = first.to_sparse()
    ours, theirs = (
        LeanStreamingDropBack("mlp-90k", SEED, 1500, 0.05),
        StreamingDropBack("mlp-90k", SEED, 1500, 0.05),
    )
    ours.load(published)
    theirs.load(published)
    assert encode(ours.to_sparse()) == encode(theirs.to_sparse())  # the same trim to k, bit for bit


def test_row_blocks_are_refused_for_a_model_that_is_not_linear():
    with pytest.raises(ConfigError, match="row blocks"):
        LeanStreamingDropBack("cnn-bn-prelu", SEED, 100, 0.1, block_weights=1024)
