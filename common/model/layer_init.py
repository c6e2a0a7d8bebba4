"""Which `InitSpec` each parameter gets, by layer type (part of init scheme v1).

Families (chosen per model in the registry):
- ``torch-default``: PyTorch's defaults for Linear/Conv: weight and bias
  uniform(+-1/sqrt(fan_in)) (kaiming_uniform with a = sqrt(5)).
- ``kaiming-uniform``: weight uniform(+-sqrt(6/fan_in)), bias as torch-default.
- ``kaiming-normal``: weight normal(0, sqrt(2/fan_in)), bias as torch-default.
- ``lecun-uniform``: weight uniform(+-sqrt(3/fan_in)), bias as torch-default.
- ``lecun-normal``: weight normal(0, sqrt(1/fan_in)), bias as torch-default.
In every family batch-norm scale is 1, shift 0, and PReLU slopes 0.25, so
DropBack can prune them like any other weight and regenerate them from nothing.
"""

import math

from dropfleet.common.errors import InitSchemeError
from dropfleet.common.model.arch import Arch, BatchNorm2d, Conv2d, Linear, PReLU, named_layers
from dropfleet.common.seed.init_scheme import InitSpec

_WEIGHT_RULES = {
    "torch-default": lambda fan_in: InitSpec("uniform", 1.0 / math.sqrt(fan_in)),
    "kaiming-uniform": lambda fan_in: InitSpec("uniform", math.sqrt(6.0 / fan_in)),
    "kaiming-normal": lambda fan_in: InitSpec("normal", math.sqrt(2.0 / fan_in)),
    "lecun-uniform": lambda fan_in: InitSpec("uniform", math.sqrt(3.0 / fan_in)),
    "lecun-normal": lambda fan_in: InitSpec("normal", math.sqrt(1.0 / fan_in)),
}
INIT_FAMILIES = frozenset(_WEIGHT_RULES)


def layer_init_specs(arch: Arch, family: str) -> dict[str, InitSpec]:
    """The init spec of every parameter of `arch`, keyed by parameter name."""
    if family not in _WEIGHT_RULES:
        raise InitSchemeError(f"unknown init family {family!r}; known: {sorted(_WEIGHT_RULES)}")
    weight_rule = _WEIGHT_RULES[family]
    specs: dict[str, InitSpec] = {}
    for name, layer in named_layers(arch):
        own = dict(layer.params())
        if not own:
            continue
        if isinstance(layer, (Linear, Conv2d)):
            specs[f"{name}.weight"] = weight_rule(layer.fan_in)
            if "bias" in own:
                specs[f"{name}.bias"] = InitSpec("uniform", 1.0 / math.sqrt(layer.fan_in))
        elif isinstance(layer, BatchNorm2d):
            specs[f"{name}.weight"] = InitSpec("constant", 1.0)
            specs[f"{name}.bias"] = InitSpec("constant", 0.0)
        elif isinstance(layer, PReLU):
            specs[f"{name}.weight"] = InitSpec("constant", 0.25)
        else:
            raise InitSchemeError(f"no init rule for parameters of {type(layer).__name__} ({name!r})")
    return specs
