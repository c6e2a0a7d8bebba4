"""The NumPy network against torch's autograd: the same logits, loss, gradients and batch-norm state."""

import numpy as np
import pytest
import torch

from dropfleet.common.device.data import load_fashion_mnist
from dropfleet.common.device.lean.network import Network, cross_entropy, seeded_network
from dropfleet.common.model.arch import MaxPool2d
from dropfleet.common.model.registry import MODELS, get_model_entry
from dropfleet.common.model.torch_model import seeded_model


@pytest.fixture(scope="module")
def batch():
    """16 real Fashion-MNIST test images and labels, normalized as a device trains on them."""
    split = load_fashion_mnist("test", indices=np.arange(100, 116))
    return split.images.numpy(), split.labels.numpy()


def lean_twin(model_id: str, seed: int = 7) -> tuple[torch.nn.Module, Network]:
    """The seeded torch model and a NumPy network holding a copy of its parameters."""
    model = seeded_model(model_id, seed)
    flat = torch.cat([p.detach().flatten() for p in model.parameters()]).numpy().copy()
    return model, Network(get_model_entry(model_id).arch, flat)


def torch_step(model: torch.nn.Module, x: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
    model.zero_grad()
    loss = torch.nn.functional.cross_entropy(model(torch.from_numpy(x)), torch.from_numpy(y))
    loss.backward()
    return float(loss.detach()), torch.cat([p.grad.flatten() for p in model.parameters()]).numpy()


@pytest.mark.parametrize("model_id", sorted(MODELS))
def test_training_steps_match_torch(model_id, batch):
    x, y = batch
    model, net = lean_twin(model_id)
    model.train()
    for _ in range(3):  # batch norm's running statistics move with every training forward
        want_loss, want_grads = torch_step(model, x, y)
        loss = net.loss_and_grads(x, y)
        assert loss == pytest.approx(want_loss, rel=1e-5)
        # float32 sums over a batch of 28x28 maps in another order: agreement to ~1e-5 of gradients up to ~0.3
        np.testing.assert_allclose(net.grads, want_grads, rtol=1e-4, atol=1e-5)
    buffers = {k: v.numpy() for k, v in model.state_dict().items() if "running" in k}
    assert set(buffers) == set(net.buffers)
    for name, value in buffers.items():
        np.testing.assert_allclose(net.buffers[name], value, rtol=1e-5, atol=1e-6)
    model.eval()
    net.training = False
    with torch.no_grad():
        want = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(net.forward(x), want, rtol=1e-4, atol=1e-5)


def test_max_pool_ties_route_to_the_first_maximum_as_torch_does():
    """Windows of equal values (0/1 inputs tie in most windows): the gradient must land on the
    element torch's CPU kernel picks, the first maximum in window order."""
    rng = np.random.default_rng(3)
    x = rng.integers(0, 2, (2, 3, 7, 7)).astype(np.float32)  # odd size: torch drops the last row
    d = rng.standard_normal((2, 3, 3, 3)).astype(np.float32)
    xt = torch.from_numpy(x).requires_grad_()
    yt = torch.nn.functional.max_pool2d(xt, 2)
    yt.backward(torch.from_numpy(d))
    net = Network((MaxPool2d(2),), np.zeros(0, np.float32))
    np.testing.assert_array_equal(net.forward(x), yt.detach().numpy())
    np.testing.assert_array_equal(net.backward(d), xt.grad.numpy())


def test_input_gradients_match_torch_through_every_layer_type(batch):
    x, y = batch
    model, net = lean_twin("cnn-bn-prelu")
    xt = torch.from_numpy(x).requires_grad_()
    torch.nn.functional.cross_entropy(model.train()(xt), torch.from_numpy(y)).backward()
    _, d = cross_entropy(net.forward(x), y)
    np.testing.assert_allclose(net.backward(d), xt.grad.numpy(), rtol=1e-4, atol=1e-6)


def test_parameters_are_views_of_one_flat_buffer_in_torch_order():
    model, net = lean_twin("mlp-90k")
    for name, p in model.named_parameters():
        view = net.tensor(name)
        assert view.shape == tuple(p.shape) and np.shares_memory(view, net.params)
        np.testing.assert_array_equal(view, p.detach().numpy())
    with pytest.raises(ValueError, match="float32 of shape"):
        Network(get_model_entry("mlp-90k").arch, np.zeros(10, np.float32))


@pytest.mark.parametrize("model_id", sorted(MODELS))
def test_a_seeded_network_holds_the_torch_models_initial_weights_bit_for_bit(model_id):
    model = seeded_model(model_id, 1234)
    want = torch.cat([p.detach().flatten() for p in model.parameters()]).numpy()
    np.testing.assert_array_equal(seeded_network(model_id, 1234).params, want)
