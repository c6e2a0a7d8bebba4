"""What a registered model is made of, without torch: its layers in order and the parameters each holds.

A model is a plain sequence of layers, the same sequence an `nn.Sequential` of
them holds, so a parameter is named "<layer index>.<weight|bias>" exactly as
torch names it. The server, the wire codec and a board without torch read
names, shapes and fan-ins from here; the torch modules are built from this
description (`torch_model.py`), never the other way around.
"""

import itertools
import math
from collections.abc import Iterator
from dataclasses import dataclass

Shape = tuple[int, ...]


@dataclass(frozen=True)
class Layer:
    """A layer with no parameters of its own (subclasses that have some override `params`)."""

    def params(self) -> tuple[tuple[str, Shape], ...]:
        """The layer's own parameters, (local name, shape), in the order torch registers them."""
        return ()

    def output_shape(self, shape: Shape) -> Shape:
        """The shape of one example's output, given one example's input shape (no batch dimension)."""
        return shape


@dataclass(frozen=True)
class Flatten(Layer):
    """Flattens every dimension after the batch one (torch's default start_dim=1)."""

    def output_shape(self, shape: Shape) -> Shape:
        return (math.prod(shape),)


@dataclass(frozen=True)
class ReLU(Layer):
    pass


@dataclass(frozen=True)
class MaxPool2d(Layer):
    """Max over kernel_size x kernel_size windows with stride kernel_size (torch's default)."""

    kernel_size: int

    def output_shape(self, shape: Shape) -> Shape:
        channels, h, w = shape
        return (channels, h // self.kernel_size, w // self.kernel_size)  # torch floors: ceil_mode=False


@dataclass(frozen=True)
class Linear(Layer):
    in_features: int
    out_features: int
    bias: bool = True

    @property
    def fan_in(self) -> int:
        return self.in_features

    def output_shape(self, shape: Shape) -> Shape:
        return (*shape[:-1], self.out_features)

    def params(self) -> tuple[tuple[str, Shape], ...]:
        weight = ("weight", (self.out_features, self.in_features))
        return (weight, ("bias", (self.out_features,))) if self.bias else (weight,)


@dataclass(frozen=True)
class Conv2d(Layer):
    in_channels: int
    out_channels: int
    kernel_size: int
    padding: int = 0
    bias: bool = True

    @property
    def fan_in(self) -> int:
        # what torch's init reads as weight[0].numel(): one output channel's inputs
        return self.in_channels * self.kernel_size * self.kernel_size

    def output_shape(self, shape: Shape) -> Shape:
        _, h, w = shape  # stride 1, so each side grows by the padding and shrinks by the kernel
        grow = 2 * self.padding - self.kernel_size + 1
        return (self.out_channels, h + grow, w + grow)

    def params(self) -> tuple[tuple[str, Shape], ...]:
        weight = ("weight", (self.out_channels, self.in_channels, self.kernel_size, self.kernel_size))
        return (weight, ("bias", (self.out_channels,))) if self.bias else (weight,)


@dataclass(frozen=True)
class BatchNorm2d(Layer):
    """Per-channel scale and shift; its running statistics are buffers, not parameters."""

    num_features: int

    def params(self) -> tuple[tuple[str, Shape], ...]:
        return (("weight", (self.num_features,)), ("bias", (self.num_features,)))


@dataclass(frozen=True)
class PReLU(Layer):
    num_parameters: int = 1

    def params(self) -> tuple[tuple[str, Shape], ...]:
        return (("weight", (self.num_parameters,)),)


Arch = tuple[Layer, ...]


def named_layers(arch: Arch) -> Iterator[tuple[str, Layer]]:
    """Each layer with the name torch's `nn.Sequential` gives it (its index)."""
    for i, layer in enumerate(arch):
        yield str(i), layer


def parameter_shapes(arch: Arch) -> list[tuple[str, Shape]]:
    """Every parameter as (full name, shape), in the order torch's `named_parameters()` yields them."""
    return [
        (f"{name}.{local}", shape) for name, layer in named_layers(arch) for local, shape in layer.params()
    ]


def output_shapes(arch: Arch, input_shape: Shape) -> list[Shape]:
    """Each layer's output shape for one example of `input_shape` (shape arithmetic, nothing computed)."""
    shapes = []
    for layer in arch:
        input_shape = layer.output_shape(input_shape)
        shapes.append(input_shape)
    return shapes


def mlp(*widths: int) -> Arch:
    """Flatten, then Linear layers between consecutive widths with a ReLU between each two."""
    layers: list[Layer] = [Flatten()]
    for i, (a, b) in enumerate(itertools.pairwise(widths)):
        layers.append(Linear(a, b))
        if i < len(widths) - 2:
            layers.append(ReLU())
    return tuple(layers)


def cnn_bn_prelu() -> Arch:
    """Two 3x3 conv blocks (conv, batch norm, PReLU, 2x2 max pool), then a linear classifier; 28x28 input."""
    return (
        Conv2d(1, 16, 3, padding=1),
        BatchNorm2d(16),
        PReLU(16),
        MaxPool2d(2),
        Conv2d(16, 32, 3, padding=1),
        BatchNorm2d(32),
        PReLU(32),
        MaxPool2d(2),
        Flatten(),
        Linear(32 * 7 * 7, 10),
    )
