"""The torch-free arch describes exactly the torch module built from it: names, shapes, init specs, w0."""

import hashlib
import math

import numpy as np
import pytest
from torch import nn

from dropfleet.common.errors import InitSchemeError
from dropfleet.common.model.arch import Layer, Linear, parameter_shapes
from dropfleet.common.model.layer_init import INIT_FAMILIES, layer_init_specs
from dropfleet.common.model.layout import model_layout
from dropfleet.common.model.registry import MODELS
from dropfleet.common.model.torch_model import build_model, seeded_model
from dropfleet.common.seed.init_scheme import InitSpec, initial_tensor
from tests.common.seed.test_init_scheme import MODEL_HASHES


def torch_derived_specs(model: nn.Module, family: str) -> dict[str, InitSpec]:
    """The init specs as dropfleet read them off the nn.Module before the arch existed (the reference)."""
    weight_rules = {
        "torch-default": lambda fan_in: InitSpec("uniform", 1.0 / math.sqrt(fan_in)),
        "kaiming-uniform": lambda fan_in: InitSpec("uniform", math.sqrt(6.0 / fan_in)),
        "kaiming-normal": lambda fan_in: InitSpec("normal", math.sqrt(2.0 / fan_in)),
        "lecun-uniform": lambda fan_in: InitSpec("uniform", math.sqrt(3.0 / fan_in)),
        "lecun-normal": lambda fan_in: InitSpec("normal", math.sqrt(1.0 / fan_in)),
    }
    specs: dict[str, InitSpec] = {}
    for module_name, module in model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        if not dict(module.named_parameters(recurse=False)):
            continue
        if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            fan_in = module.weight[0].numel()
            specs[prefix + "weight"] = weight_rules[family](fan_in)
            if module.bias is not None:
                specs[prefix + "bias"] = InitSpec("uniform", 1.0 / math.sqrt(fan_in))
        elif isinstance(module, nn.modules.batchnorm._NormBase):
            specs[prefix + "weight"] = InitSpec("constant", 1.0)
            specs[prefix + "bias"] = InitSpec("constant", 0.0)
        elif isinstance(module, nn.PReLU):
            specs[prefix + "weight"] = InitSpec("constant", 0.25)
        else:
            raise AssertionError(f"no reference rule for {type(module).__name__}")
    return specs


@pytest.mark.parametrize("model_id", sorted(MODELS))
def test_arch_parameters_are_the_torch_modules_named_parameters(model_id: str) -> None:
    want = [(name, tuple(p.shape)) for name, p in build_model(model_id).named_parameters()]
    assert parameter_shapes(MODELS[model_id].arch) == want
    assert [(t.name, t.shape) for t in model_layout(model_id).tensors] == want


@pytest.mark.parametrize("family", sorted(INIT_FAMILIES))
@pytest.mark.parametrize("model_id", sorted(MODELS))
def test_init_specs_from_the_arch_equal_the_torch_derived_ones(model_id: str, family: str) -> None:
    # every family on every model, not just the registered one: the rules must agree layer by layer
    model = build_model(model_id)
    assert layer_init_specs(MODELS[model_id].arch, family) == torch_derived_specs(model, family)


@pytest.mark.parametrize("model_id", sorted(MODELS))
def test_the_layout_holds_the_registered_familys_specs(model_id: str) -> None:
    entry = MODELS[model_id]
    want = torch_derived_specs(build_model(model_id), entry.init_family)
    assert {t.name: t.init for t in model_layout(model_id).tensors} == want


@pytest.mark.parametrize("model_id", sorted(MODEL_HASHES))
def test_the_whole_model_hash_needs_no_torch_module(model_id: str) -> None:
    # w0 from the layout alone (what a torch-free board or server regenerates) is the seeded module's
    h = hashlib.sha256()
    seeded = dict(seeded_model(model_id, 7).named_parameters())
    for t in model_layout(model_id).tensors:
        w0 = initial_tensor(7, t.name, t.init, t.shape)
        assert np.array_equal(w0, seeded[t.name].detach().numpy())
        h.update(np.ascontiguousarray(w0).tobytes())
    assert h.hexdigest() == MODEL_HASHES[model_id]


def test_linear_without_bias_has_only_a_weight() -> None:
    arch = (Linear(4, 3, bias=False),)
    assert parameter_shapes(arch) == [("0.weight", (3, 4))]
    assert layer_init_specs(arch, "torch-default") == {"0.weight": InitSpec("uniform", 0.5)}


class _Gate(Layer):
    """A layer with a parameter that no init rule covers."""

    def params(self) -> tuple[tuple[str, tuple[int, ...]], ...]:
        return (("weight", (2,)),)


def test_a_layer_without_an_init_rule_is_refused() -> None:
    with pytest.raises(InitSchemeError, match="_Gate"):
        layer_init_specs((_Gate(),), "torch-default")


def test_an_unknown_family_is_refused() -> None:
    with pytest.raises(InitSchemeError, match="known"):
        layer_init_specs(MODELS["mlp-90k"].arch, "xavier")
