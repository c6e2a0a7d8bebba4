"""The lean DropBack against the torch optimizer: the same steps, tracked sets and wire bytes."""

import numpy as np
import pytest
import torch

from dropfleet.common.device.data import load_fashion_mnist
from dropfleet.common.device.dropback import DropBack, sparse_from_optimizer
from dropfleet.common.device.lean.dropback import LeanDropBack
from dropfleet.common.device.lean.network import seeded_network
from dropfleet.common.errors import ConfigError
from dropfleet.common.model.torch_model import seeded_model
from dropfleet.common.wire.codec import encode

SEED = 11


@pytest.fixture(scope="module")
def batches():
    """Real Fashion-MNIST batches of 32, the same for both trainers."""
    split = load_fashion_mnist("train", indices=np.arange(0, 32 * 40))
    x, y = split.images.numpy(), split.labels.numpy()
    return [(x[i : i + 32], y[i : i + 32]) for i in range(0, len(x), 32)]


def torch_grads(model, x, y):
    model.zero_grad()
    torch.nn.functional.cross_entropy(model(torch.from_numpy(x)), torch.from_numpy(y)).backward()


@pytest.mark.parametrize("model_id, k", [("mlp-90k", 3000), ("cnn-bn-prelu", 1500)])
def test_given_the_same_gradients_both_take_the_same_steps_bit_for_bit(model_id, k, batches):
    model = seeded_model(model_id, SEED)
    torch_opt = DropBack(model.parameters(), lr=0.05, k=k, freeze_after=15)
    net = seeded_network(model_id, SEED)
    lean = LeanDropBack(net, lr=0.05, k=k, freeze_after=15)
    for x, y in batches[:20]:  # through the freeze at step 15
        torch_opt.zero_grad()
        torch_grads(model, x, y)
        net.grads[:] = torch.cat([p.grad.flatten() for p in model.parameters()]).numpy()
        torch_opt.step()
        lean.step()
        flat = torch.cat([p.detach().flatten() for p in model.parameters()]).numpy()
        np.testing.assert_array_equal(net.params, flat)
    assert lean.frozen and torch_opt.frozen and lean.steps == torch_opt.steps == 20
    assert lean.tracked.size == k
    # The same wire bytes: what a lean board sends is what a torch board would.
    sent = sparse_from_optimizer(model, torch_opt, SEED, model_id)
    assert encode(lean.to_sparse(model_id, SEED)) == encode(sent)


# The CNN at a rate it trains stably with: at 0.05 its loss jumps (4.3, 1.1, 2.6 within 40 steps),
# and such a trajectory amplifies any float32 difference, as between two builds of torch.
@pytest.mark.parametrize("model_id, k, lr", [("mlp-90k", 3000, 0.05), ("cnn-bn-prelu", 1500, 0.02)])
def test_trained_on_its_own_gradients_it_keeps_the_torch_trainers_tracked_set(model_id, k, lr, batches):
    """40 steps on real data, each trainer with its own backward: float32 sums in another order
    may swap near-ties at the k-th score, nothing more."""
    model = seeded_model(model_id, SEED)
    torch_opt = DropBack(model.parameters(), lr=lr, k=k)
    lean = LeanDropBack(seeded_network(model_id, SEED), lr=lr, k=k)
    for x, y in batches:
        torch_opt.zero_grad()
        torch_grads(model, x, y)
        torch_opt.step()
        lean.network.loss_and_grads(x, y)
        lean.step()
    want = sparse_from_optimizer(model, torch_opt, SEED, model_id)
    got = lean.to_sparse(model_id, SEED)
    ours, theirs = got.flat_positions(), want.flat_positions()
    shared = np.intersect1d(ours, theirs)
    assert shared.size / np.union1d(ours, theirs).size >= 0.99
    delta_ours = dict(zip(ours, np.concatenate([t.values for t in got.tensors]), strict=True))
    delta_theirs = dict(zip(theirs, np.concatenate([t.values for t in want.tensors]), strict=True))
    gaps = np.array([abs(delta_ours[i] - delta_theirs[i]) for i in shared])
    scale = np.abs(np.concatenate([t.values for t in want.tensors])).max()
    # 40 steps of float32 drift (through batch norm for the CNN): measured 0.27% of the largest
    # delta for the CNN, 0.00005% for the MLP.
    assert gaps.max() <= 5e-3 * scale, (gaps.max(), scale)


def test_bad_hyperparameters_are_refused_by_name():
    net = seeded_network("mlp-90k", 1)
    bad = (({"k": 0}, "k"), ({"lr": -1.0}, "learning rate"), ({"freeze_after": -1}, "freeze_after"))
    for kwargs, name in bad:
        with pytest.raises(ConfigError, match=name):
            LeanDropBack(net, **({"lr": 0.1, "k": 10} | kwargs))
