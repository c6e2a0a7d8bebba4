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

import numpy as np
import torch
from torch import nn

from dropfleet.common.errors import InitSchemeError
from dropfleet.common.model.registry import build_model, get_model_entry
from dropfleet.common.seed.init_scheme import INIT_SCHEME_VERSION, InitSpec, initial_tensor

_WEIGHT_RULES = {
    "torch-default": lambda fan_in: InitSpec("uniform", 1.0 / math.sqrt(fan_in)),
    "kaiming-uniform": lambda fan_in: InitSpec("uniform", math.sqrt(6.0 / fan_in)),
    "kaiming-normal": lambda fan_in: InitSpec("normal", math.sqrt(2.0 / fan_in)),
    "lecun-uniform": lambda fan_in: InitSpec("uniform", math.sqrt(3.0 / fan_in)),
    "lecun-normal": lambda fan_in: InitSpec("normal", math.sqrt(1.0 / fan_in)),
}
INIT_FAMILIES = frozenset(_WEIGHT_RULES)


def layer_init_specs(model: nn.Module, family: str) -> dict[str, InitSpec]:
    """The init spec of every parameter of `model`, keyed by parameter name."""
    if family not in _WEIGHT_RULES:
        raise InitSchemeError(f"unknown init family {family!r}; known: {sorted(_WEIGHT_RULES)}")
    weight_rule = _WEIGHT_RULES[family]
    specs: dict[str, InitSpec] = {}
    for module_name, module in model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        own = dict(module.named_parameters(recurse=False))
        if not own:
            continue
        if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            fan_in = module.weight[0].numel()
            specs[prefix + "weight"] = weight_rule(fan_in)
            if module.bias is not None:
                specs[prefix + "bias"] = InitSpec("uniform", 1.0 / math.sqrt(fan_in))
        elif isinstance(module, nn.modules.batchnorm._NormBase):
            specs[prefix + "weight"] = InitSpec("constant", 1.0)
            specs[prefix + "bias"] = InitSpec("constant", 0.0)
        elif isinstance(module, nn.PReLU):
            specs[prefix + "weight"] = InitSpec("constant", 0.25)
        else:
            raise InitSchemeError(f"no init rule for parameters of {type(module).__name__} ({module_name!r})")
    return specs


def seeded_model(model_id: str, seed: int, scheme: int = INIT_SCHEME_VERSION) -> nn.Module:
    """A registered model whose every parameter holds its seeded initial value."""
    model = build_model(model_id)
    specs = layer_init_specs(model, get_model_entry(model_id).init_family)
    with torch.no_grad():
        for name, p in model.named_parameters():
            w0 = initial_tensor(seed, name, specs[name], tuple(p.shape), scheme)
            p.copy_(torch.from_numpy(np.ascontiguousarray(w0)))
    return model
