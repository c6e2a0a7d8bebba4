"""Run config: pyproject's [tool.flwr.app.config] and RunConfig agree; bad values are named."""

import itertools
import tomllib
from pathlib import Path

import pytest

from dropfleet.common.errors import ConfigError
from dropfleet.fleet.config import PRESETS, RunConfig

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def test_pyproject_config_matches_the_defaults():
    raw = tomllib.loads(PYPROJECT.read_text())["tool"]["flwr"]["app"]["config"]
    parsed = RunConfig.from_mapping(raw)
    assert parsed == RunConfig()
    assert set(raw) == {f.replace("_", "-") for f in RunConfig.model_fields}


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        ({"rounds": 3}, "unknown run-config key 'rounds'"),
        ({"global-k": "many"}, "'global-k' must be float"),
        ({"global-k": 12.5}, "'global-k' has an invalid value: 12.5"),
        ({"global-k": 0}, "'global-k' has an invalid value: 0"),
        ({"strategy": "fedprox"}, "'strategy'"),
        ({"value-precision": "fp8"}, "'value-precision'"),
        ({"model-id": "gpt"}, "'model-id'"),
        ({"resume-run": "last"}, "'resume-run'"),
        ({"resume-run": "12", "strategy": "fedavg"}, "needs strategy 'dropback'"),
        ({"learning-rate": -0.1}, "'learning-rate'"),
        ({"alpha": True}, "'alpha' must be float"),
    ],
)
def test_bad_values_are_named(raw, needle):
    with pytest.raises(ConfigError, match=needle):
        RunConfig.from_mapping(raw)


def test_ints_are_accepted_for_floats():
    assert RunConfig.from_mapping({"learning-rate": 1}).learning_rate == 1.0


def test_global_k_is_a_count_or_a_fraction_of_the_model():
    assert RunConfig.from_mapping({}).global_k_count == 8961  # N/10 of mlp-90k
    assert RunConfig.from_mapping({"model-id": "cnn-bn-prelu"}).global_k_count == 2063  # N/10 of 20,634
    assert RunConfig.from_mapping({"global-k": 3000}).global_k_count == 3000


def test_cosine_schedule_decays_from_the_learning_rate_toward_the_final_one():
    config = RunConfig.from_mapping(
        {
            "learning-rate-schedule": "cosine",
            "learning-rate": 0.1,
            "final-learning-rate": 0.02,
            "num-server-rounds": 10,
        }
    )
    rates = [config.learning_rate_at(r) for r in range(1, 11)]
    assert rates[0] == pytest.approx(0.1) and all(a > b for a, b in itertools.pairwise(rates))
    assert rates[-1] > 0.02 and config.learning_rate_at(11) == pytest.approx(0.02)
    assert rates[4] + rates[6] == pytest.approx(0.12)  # symmetric about the middle of the run
    assert RunConfig(strategy="dropback").learning_rate_at(7) == 0.1  # constant in the paper's scheme


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        ({"learning-rate-schedule": "step"}, "'learning-rate-schedule'"),
        ({"learning-rate-schedule": "cosine", "final-learning-rate": 0.5}, "'final-learning-rate'"),
        ({"server-momentum": 1.0}, "'server-momentum'"),
        ({"server-learning-rate": 0.0}, "'server-learning-rate'"),
        ({"server-momentum": 0.5, "strategy": "fedavg"}, "need strategy 'dropback'"),
        ({"update-memory-rounds": -1}, "'update-memory-rounds'"),
        ({"update-memory-rounds": 5, "strategy": "topk-ef"}, "needs strategy 'dropback'"),
        ({"server-optimizer": "sgd"}, "'server-optimizer'.*known: momentum, adam, yogi"),
        ({"server-optimizer": "adam", "server-momentum": 0.5}, "'server-beta1'"),
        ({"server-optimizer": "adam", "strategy": "fedavg"}, "need strategy 'dropback'"),
        ({"server-beta1": 1.0}, "'server-beta1'"),
        ({"server-tau": 0.0}, "'server-tau'"),
        ({"downlink-coding": "diff"}, "'downlink-coding'.*known: whole, delta"),
        (
            {"downlink-coding": "delta", "value-precision": "fp16"},
            "int8 or int4 .'value-precision'., not 'fp16",
        ),
        ({"downlink-coding": "delta", "strategy": "topk-ef", "value-precision": "int8"}, "needs strategy"),
        ({"downlink-grid-exponent": 1}, "'downlink-grid-exponent'"),
        ({"value-precision": "ternary"}, "ternary values"),
        ({"uplink-precision": "ternary", "strategy": "dropback"}, "ternary values"),  # whole deltas
    ],
)
def test_new_knobs_are_checked(raw, needle):
    with pytest.raises(ConfigError, match=needle):
        RunConfig.from_mapping(raw)


def test_dropback_momentum_presets_the_winning_levers_unless_a_key_was_set():
    config = RunConfig.from_mapping({"strategy": "dropback-momentum"})
    assert (
        config.aggregation,
        config.server_momentum,
        config.server_learning_rate,
        config.update_memory_rounds,
        config.learning_rate_schedule,
    ) == ("tracked-mean", 0.4, 1.5, 10, "cosine")
    assert (config.uplink_coding, config.uplink_values, config.value_precision) == ("change", "int4", "int4")
    assert config.downlink_coding == "delta"
    mine = RunConfig.from_mapping({"strategy": "dropback-momentum", "server-momentum": 0.5})
    assert mine.server_momentum == 0.5 and mine.aggregation == "tracked-mean"
    paper = RunConfig.from_mapping({"strategy": "dropback"})
    assert (paper.aggregation, paper.server_momentum, paper.learning_rate_schedule) == (
        "mean",
        0.0,
        "constant",
    )


def test_ternary_values_are_for_top_k_and_change_coded_uplinks():
    assert (
        RunConfig.from_mapping({"strategy": "topk-ef", "value-precision": "ternary"}).uplink_values
        == "ternary"
    )
    mine = RunConfig.from_mapping({"strategy": "dropback-momentum", "uplink-precision": "ternary"})
    assert (mine.uplink_coding, mine.uplink_values) == ("change", "ternary")


def test_dropback_momentum_with_adam_keeps_the_other_levers():
    config = RunConfig.from_mapping(
        {"strategy": "dropback-momentum", "server-optimizer": "adam", "server-learning-rate": 0.1}
    )
    assert (config.server_optimizer, config.server_momentum, config.aggregation) == (
        "adam",
        0.0,
        "tracked-mean",
    )
    assert config.uses_server_optimizer
    # the preset's server step is FedAvgM's: Yogi keeps its own eta's default
    yogi = RunConfig.from_mapping({"strategy": "dropback-momentum", "server-optimizer": "yogi"})
    assert (yogi.server_learning_rate, yogi.update_memory_rounds) == (1.0, 10)


def test_the_default_is_the_winning_recipe_and_the_papers_scheme_is_one_switch_away():
    winner = RunConfig.from_mapping({"strategy": "dropback-momentum"})
    assert RunConfig() == RunConfig.from_mapping({}) == winner
    assert (RunConfig().strategy, RunConfig().aggregation, RunConfig().downlink_coding) == (
        "dropback-momentum",
        "tracked-mean",
        "delta",
    )
    paper = RunConfig.from_mapping({"strategy": "dropback"})
    assert (paper.value_precision, paper.uplink_coding, paper.update_memory_rounds) == ("fp16", "delta", 0)


@pytest.mark.parametrize(
    ("key", "value", "name"),
    [
        ("aggregation", "mean", "aggregation"),  # equal to the paper's default: still the user's
        ("server-momentum", 0.0, "server_momentum"),
        ("update-memory-rounds", 0, "update_memory_rounds"),
        ("learning-rate-schedule", "constant", "learning_rate_schedule"),
        ("value-precision", "int8", "value_precision"),
    ],
)
def test_an_explicit_value_always_wins_over_the_recipe(key, value, name):
    config = RunConfig.from_mapping({"strategy": "dropback-momentum", key: value})
    assert getattr(config, name) == value
    assert getattr(RunConfig(**{name: value}), name) == value  # by Python name too


def test_the_sentinel_takes_the_strategys_recipe():
    sentinel = {"aggregation": "", "server-momentum": "", "value-precision": ""}
    mine = RunConfig.from_mapping({"strategy": "dropback-momentum", **sentinel})
    paper = RunConfig.from_mapping({"strategy": "dropback", **sentinel})
    assert (mine.aggregation, mine.server_momentum, mine.value_precision) == ("tracked-mean", 0.4, "int4")
    assert (paper.aggregation, paper.server_momentum, paper.value_precision) == ("mean", 0.0, "fp16")
    with pytest.raises(ConfigError, match="'trim-fraction' must be float"):  # only recipe keys take it
        RunConfig.from_mapping({"trim-fraction": ""})


def test_every_bad_key_is_named_at_once():
    with pytest.raises(ConfigError) as raised:
        RunConfig.from_mapping({"seed": -1, "model-id": "gpt", "alpha": "x", "learning-rate": float("nan")})
    lines = str(raised.value).splitlines()
    assert len(lines) == 4
    for key in ("'seed'", "'model-id'", "'alpha'", "'learning-rate'"):
        assert sum(key in line for line in lines) == 1


def test_keys_are_kebab_case_and_the_config_is_frozen():
    with pytest.raises(ConfigError, match="unknown run-config key 'global_k'"):
        RunConfig.from_mapping({"global_k": 3000})
    with pytest.raises(ValueError):
        RunConfig().seed = 3  # type: ignore[misc]


def test_the_configuration_doc_shows_every_key_its_default_and_the_recipes():
    doc = (PYPROJECT.parent / "docs" / "configuration.md").read_text()
    recipes, keys = doc.split("## The keys, by concern")

    def rows(text):
        found = [line.split("|")[1:-1] for line in text.splitlines() if line.startswith("| `")]
        names = [cells[0].strip(" `") for cells in found]
        assert len(names) == len(set(names)), "a key listed twice"
        return {name: [c.strip() for c in cells[1:]] for name, cells in zip(names, found, strict=True)}

    raw = tomllib.loads(PYPROJECT.read_text())["tool"]["flwr"]["app"]["config"]
    listed = rows(keys)
    assert set(listed) == set(raw)
    for key, default in raw.items():
        shown = "recipe" if key in RECIPE else f"`{default}`" if default != "" else '`""`'
        assert listed[key][0] == shown, key
    recipe = rows(recipes)
    assert set(recipe) == set(RECIPE)
    for name, value in PRESETS["dropback-momentum"].items():
        assert recipe[name.replace("_", "-")][0] == f"`{value}`", name
    paper = RunConfig(strategy="dropback")
    for key in RECIPE:
        value = getattr(paper, key.replace("-", "_"))
        assert recipe[key][1] == (f"`{value}`" if value != "" else "as `value-precision`"), key


RECIPE = {name.replace("_", "-") for name in PRESETS["dropback-momentum"]}
