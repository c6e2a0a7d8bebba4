"""A registered model on NumPy alone: forward and backward by hand, for a board without torch.

The parameters live in one flat float32 buffer in the layout's order (the
order torch's `named_parameters()` yields, `common/model/arch.py`), with a
view per tensor, and the gradients in a second buffer of the same shape: the
DropBack selection reads both as they are, with no copy and no per-step
allocation of N floats. Batch norm's running statistics are buffers, not
parameters, as in torch.

Each layer type matches torch's semantics (checked against torch autograd in
`tests/common/device/lean/test_network.py`): `Linear` is x Wᵀ + b; `Conv2d`
is a cross-correlation (im2col); `BatchNorm2d` normalizes with the biased
batch variance and keeps the unbiased one in its running variance (momentum
0.1, eps 1e-5); `PReLU` is max(0, x) + a·min(0, x) per channel; `MaxPool2d`
routes the gradient to the first maximum of each window, as torch's CPU kernel
does (constant backgrounds tie often); the loss is the mean softmax
cross-entropy. The arithmetic is float32 BLAS, so results agree with torch's
within float tolerance, not bit for bit.
"""

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dropfleet.common.errors import UnknownModelError
from dropfleet.common.model.arch import (
    Arch,
    BatchNorm2d,
    Conv2d,
    Flatten,
    Layer,
    Linear,
    MaxPool2d,
    PReLU,
    ReLU,
    parameter_shapes,
)
from dropfleet.common.model.layout import model_layout
from dropfleet.common.model.registry import get_model_entry
from dropfleet.common.seed.init_scheme import INIT_SCHEME_VERSION, initial_range

BN_EPS = 1e-5
BN_MOMENTUM = 0.1


@dataclass
class LayerStep:
    """One layer at work: its parameter and gradient arrays, and what its forward kept for backward."""

    layer: Layer
    params: dict[str, np.ndarray]
    grads: dict[str, np.ndarray]
    cache: Any = None


@dataclass
class Network:
    """`arch` with its parameters in `params` (flat, float32) and their gradients in `grads`."""

    arch: Arch
    params: np.ndarray
    grads: np.ndarray = field(init=False)
    buffers: dict[str, np.ndarray] = field(init=False)
    training: bool = True
    # Batch norm's running-statistics momentum; recalibration averages instead (lean/train.py).
    bn_momentum: float = BN_MOMENTUM

    def __post_init__(self) -> None:
        shapes = parameter_shapes(self.arch)
        numel = sum(int(np.prod(s)) for _, s in shapes)
        if self.params.dtype != np.float32 or self.params.shape != (numel,):
            got = f"{self.params.dtype} {self.params.shape}"
            raise ValueError(f"params must be float32 of shape ({numel},), got {got}")
        self.grads = np.zeros_like(self.params)
        self._views: list[tuple[dict[str, np.ndarray], dict[str, np.ndarray]]] = []
        offset = 0
        for layer in self.arch:
            p, g = {}, {}
            for local, shape in layer.params():
                n = int(np.prod(shape))
                p[local] = self.params[offset : offset + n].reshape(shape)
                g[local] = self.grads[offset : offset + n].reshape(shape)
                offset += n
            self._views.append((p, g))
        self.buffers = batch_norm_buffers(self.arch)
        self._steps: list[LayerStep] = []

    def tensor(self, name: str) -> np.ndarray:
        """The view of one parameter by its torch name ("<layer>.<weight|bias>")."""
        index, local = name.split(".")
        return self._views[int(index)][0][local]

    def forward(self, x: np.ndarray) -> np.ndarray:
        """Logits for a batch; in training mode, keeps what `backward` needs."""
        self._steps = []
        for i, layer in enumerate(self.arch):
            params, grads = self._views[i]
            step = LayerStep(layer, params, grads)
            x = layer_forward(step, x, self.training, self.buffers, str(i), self.bn_momentum)
            if self.training:
                self._steps.append(step)
        return x

    def backward(self, d: np.ndarray) -> np.ndarray:
        """From the gradient of the last training forward's output: `grads` holds the parameters'
        gradient (overwritten, not added), and the input's gradient is returned."""
        for step in reversed(self._steps):
            d = layer_backward(step, d)
        self._steps = []
        return d

    def loss_and_grads(self, x: np.ndarray, labels: np.ndarray) -> float:
        """The batch's mean cross-entropy; `grads` then holds its gradient (overwritten, not added)."""
        loss, d = cross_entropy(self.forward(x), labels)
        self.backward(d)
        return loss


def batch_norm_buffers(arch: Arch) -> dict[str, np.ndarray]:
    """Each batch norm's running statistics, by torch's buffer name, as torch initializes them."""
    buffers = {}
    for i, layer in enumerate(arch):
        if isinstance(layer, BatchNorm2d):
            buffers[f"{i}.running_mean"] = np.zeros(layer.num_features, np.float32)
            buffers[f"{i}.running_var"] = np.ones(layer.num_features, np.float32)
    return buffers


def cross_entropy(logits: np.ndarray, labels: np.ndarray) -> tuple[float, np.ndarray]:
    """Mean softmax cross-entropy and its gradient with respect to the logits."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    total = exp.sum(axis=1, keepdims=True)
    rows = np.arange(len(labels))
    loss = float(np.mean(np.log(total[:, 0]) - shifted[rows, labels]))
    d = exp / total
    d[rows, labels] -= 1.0
    d /= len(labels)
    return loss, d.astype(np.float32, copy=False)


def layer_forward(
    step: LayerStep,
    x: np.ndarray,
    training: bool,
    buffers: dict[str, np.ndarray],
    name: str,
    momentum: float = BN_MOMENTUM,
) -> np.ndarray:
    layer, p = step.layer, step.params
    if isinstance(layer, Flatten):
        step.cache = x.shape
        return x.reshape(len(x), -1)
    if isinstance(layer, ReLU):
        step.cache = x > 0
        return np.maximum(x, 0)
    if isinstance(layer, Linear):
        step.cache = x
        y = x @ p["weight"].T
        return y + p["bias"] if layer.bias else y
    if isinstance(layer, PReLU):
        a = p["weight"].reshape((1, -1) + (1,) * (x.ndim - 2)) if x.ndim > 1 else p["weight"]
        step.cache = (x, a)
        return np.where(x > 0, x, a * x)
    if isinstance(layer, Conv2d):
        cols, out_hw = _im2col(x, layer.kernel_size, layer.padding)
        step.cache = (cols, x.shape, out_hw)
        w = p["weight"].reshape(layer.out_channels, -1)
        y = cols @ w.T  # (N*H*W, C_out)
        if layer.bias:
            y += p["bias"]
        n, (h, wd) = len(x), out_hw
        return np.ascontiguousarray(y.reshape(n, h, wd, layer.out_channels).transpose(0, 3, 1, 2))
    if isinstance(layer, BatchNorm2d):
        mean_key, var_key = f"{name}.running_mean", f"{name}.running_var"
        if training:
            mean = x.mean(axis=(0, 2, 3))
            var = x.var(axis=(0, 2, 3))
            count = x.size // x.shape[1]
            buffers[mean_key] *= 1 - momentum
            buffers[mean_key] += momentum * mean
            buffers[var_key] *= 1 - momentum
            buffers[var_key] += momentum * var * (count / max(count - 1, 1))
        else:
            mean, var = buffers[mean_key], buffers[var_key]
        inv = (1.0 / np.sqrt(var + BN_EPS)).astype(np.float32)
        xhat = (x - mean[None, :, None, None]) * inv[None, :, None, None]
        step.cache = (xhat, inv)
        return xhat * p["weight"][None, :, None, None] + p["bias"][None, :, None, None]
    if isinstance(layer, MaxPool2d):
        k = layer.kernel_size
        n, c, h, w = x.shape
        windows = x[:, :, : h - h % k, : w - w % k].reshape(n, c, h // k, k, w // k, k)
        windows = windows.transpose(0, 1, 2, 4, 3, 5).reshape(n, c, h // k, w // k, k * k)
        first = windows.argmax(axis=-1)  # the first maximum in window order, as torch picks it
        step.cache = (first, x.shape)
        return np.take_along_axis(windows, first[..., None], axis=-1)[..., 0]
    raise UnknownModelError(f"the lean runtime has no {type(layer).__name__} layer")


def layer_backward(step: LayerStep, d: np.ndarray) -> np.ndarray:
    layer, p, g = step.layer, step.params, step.grads
    if isinstance(layer, Flatten):
        return d.reshape(step.cache)
    if isinstance(layer, ReLU):
        return d * step.cache
    if isinstance(layer, Linear):
        x = step.cache
        np.matmul(d.T, x, out=g["weight"])
        if layer.bias:
            np.sum(d, axis=0, out=g["bias"])
        return d @ p["weight"]
    if isinstance(layer, PReLU):
        x, a = step.cache
        negative = x <= 0
        axes = (0, *range(2, x.ndim)) if x.ndim > 1 else (0,)
        per_channel = np.sum(d * x * negative, axis=axes)
        g["weight"][...] = per_channel if g["weight"].size > 1 else per_channel.sum()  # one slope for all
        return np.where(negative, a * d, d)
    if isinstance(layer, Conv2d):
        cols, x_shape, (h, w) = step.cache
        dy = d.transpose(0, 2, 3, 1).reshape(-1, layer.out_channels)  # (N*H*W, C_out)
        np.matmul(dy.T, cols, out=g["weight"].reshape(layer.out_channels, -1))
        if layer.bias:
            np.sum(dy, axis=0, out=g["bias"])
        dcols = dy @ p["weight"].reshape(layer.out_channels, -1)
        return _col2im(dcols, x_shape, layer.kernel_size, layer.padding, (h, w))
    if isinstance(layer, BatchNorm2d):
        xhat, inv = step.cache
        axes = (0, 2, 3)
        np.sum(d * xhat, axis=axes, out=g["weight"])
        np.sum(d, axis=axes, out=g["bias"])
        dxhat = d * p["weight"][None, :, None, None]
        count = d.size // d.shape[1]
        mean_dxhat = dxhat.sum(axis=axes, keepdims=True) / count
        mean_dxhat_xhat = (dxhat * xhat).sum(axis=axes, keepdims=True) / count
        return (dxhat - mean_dxhat - xhat * mean_dxhat_xhat) * inv[None, :, None, None]
    if isinstance(layer, MaxPool2d):
        first, (n, c, h, w) = step.cache
        k = layer.kernel_size
        spread = np.zeros((*first.shape, k * k), dtype=d.dtype)
        np.put_along_axis(spread, first[..., None], d[..., None], axis=-1)
        spread = spread.reshape(n, c, h // k, w // k, k, k).transpose(0, 1, 2, 4, 3, 5)
        dx = np.zeros((n, c, h, w), dtype=d.dtype)
        dx[:, :, : h - h % k, : w - w % k] = spread.reshape(n, c, h - h % k, w - w % k)
        return dx
    raise UnknownModelError(f"the lean runtime has no {type(layer).__name__} layer")


def _im2col(x: np.ndarray, k: int, pad: int) -> tuple[np.ndarray, tuple[int, int]]:
    """(N*H_out*W_out, C*k*k) patches, columns in (channel, row, col) order as torch's weight is."""
    n, c, h, w = x.shape
    padded = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad))) if pad else x
    h_out, w_out = h + 2 * pad - k + 1, w + 2 * pad - k + 1
    s = padded.strides
    patches = np.lib.stride_tricks.as_strided(
        padded, (n, h_out, w_out, c, k, k), (s[0], s[2], s[3], s[1], s[2], s[3]), writeable=False
    )
    return patches.reshape(n * h_out * w_out, c * k * k), (h_out, w_out)


def _col2im(
    dcols: np.ndarray, x_shape: tuple[int, ...], k: int, pad: int, out_hw: tuple[int, int]
) -> np.ndarray:
    """The adjoint of `_im2col`: each patch's gradient added back where the patch was read."""
    n, c, h, w = x_shape
    h_out, w_out = out_hw
    grads = dcols.reshape(n, h_out, w_out, c, k, k)
    padded = np.zeros((n, c, h + 2 * pad, w + 2 * pad), dtype=dcols.dtype)
    for i in range(k):
        for j in range(k):
            padded[:, :, i : i + h_out, j : j + w_out] += grads[:, :, :, :, i, j].transpose(0, 3, 1, 2)
    return padded[:, :, pad : pad + h, pad : pad + w] if pad else padded


def seeded_network(model_id: str, seed: int, scheme: int = INIT_SCHEME_VERSION) -> Network:
    """A registered model at its seeded initial weights w0: the same bits `torch_model.seeded_model`
    holds, regenerated tensor by tensor into the flat buffer (no N-sized temporaries)."""
    layout = model_layout(model_id)
    params = np.empty(int(layout.offsets[-1]), np.float32)
    for slot in layout.tensors:
        if slot.init is None:
            raise UnknownModelError(f"{model_id}: tensor {slot.name} has no init rule")
        initial_range(seed, slot.name, slot.init, 0, params[slot.offset : slot.end], scheme)
    return Network(get_model_entry(model_id).arch, params)
