"""The run configuration: one pydantic model, every bad key named.

Values come from `[tool.flwr.app.config]` in pyproject.toml, overridable per
run with `flwr run . --run-config "key=value ..."` (or `POST /v1/runs`). Keys
are grouped below by concern: the run, the devices' training, the data, the
wire, the server's merge, the fleet's bounds, the operator's paths.

A strategy's recipe (`PRESETS`) fills only the keys the run leaves unset:
pyproject.toml gives them the sentinel `""`, so an explicit value — even one
equal to the paper's default — always wins.
"""

import math
from collections.abc import Mapping
from typing import Annotated, Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from dropfleet.common.aggregate.merge import RULES
from dropfleet.common.aggregate.server_opt import OPTIMIZERS
from dropfleet.common.device.data_files import PARTITIONERS
from dropfleet.common.errors import ConfigError
from dropfleet.common.model.registry import MODELS
from dropfleet.common.model.sparse import num_weights
from dropfleet.common.wire.codec import MAX_VALUE, PRECISIONS
from dropfleet.common.wire.downlink import DELTA_LEVELS, GRID_EXPONENTS

STRATEGIES = ("dropback-momentum", "dropback", "fedavg", "topk-ef")
SPARSE_DROPBACK = ("dropback", "dropback-momentum")
DEFAULT_STRATEGY = "dropback-momentum"
# Each strategy's recipe for the keys a run leaves unset (`""` in pyproject.toml). "dropback-momentum"
# holds the levers that won the accuracy-per-byte race (bench/race.py, docs/benchmarks.md);
# "dropback" is the paper's scheme: the field defaults below.
PRESETS: dict[str, dict[str, object]] = {
    "dropback-momentum": {
        "aggregation": "tracked-mean",
        "server_momentum": 0.4,
        "server_learning_rate": 1.5,
        "update_memory_rounds": 10,
        "learning_rate_schedule": "cosine",
        "uplink_coding": "change",
        "uplink_precision": "int4",
        "downlink_coding": "delta",
        "value_precision": "int4",
    }
}
# The keys a recipe may fill; only these take the sentinel.
RECIPE_KEYS = (
    "aggregation",
    "server_momentum",
    "server_learning_rate",
    "update_memory_rounds",
    "learning_rate_schedule",
    "uplink_coding",
    "uplink_precision",
    "downlink_coding",
    "value_precision",
)
# The server step of FedAvgM: a recipe's momentum and step are dropped when the run picks adam or yogi.
_MOMENTUM_ONLY = ("server_momentum", "server_learning_rate")
# Keys only the operator sets (pyproject, `dropfleet simulate`), never a REST caller: paths on the
# server or on every board, and the run's signature, which the API computes itself. They are not
# stored with a run either (`GET /runs` would show them to every reader).
OPERATOR_KEYS = ("results-file", "store-url", "message-audit", "fashion-mnist-dir", "app-signature")
# Set by the API's resume route only (it checks the run can be taken over first).
REST_REFUSED_KEYS = (*OPERATOR_KEYS, "resume-run")
LR_SCHEDULES = ("constant", "cosine")
UPLINK_CODINGS = ("delta", "change")
DOWNLINK_CODINGS = ("whole", "delta")


def _kebab(name: str) -> str:
    return name.replace("_", "-")


Positive = Annotated[float, Field(gt=0)]
Fraction = Annotated[float, Field(ge=0, lt=1)]


class RunConfig(BaseModel):
    """One run's settings, typed and range-checked; cross-key rules in `_check_combinations`."""

    model_config = ConfigDict(
        frozen=True,
        extra="forbid",
        strict=True,
        allow_inf_nan=False,
        alias_generator=_kebab,
        validate_by_name=True,
        validate_by_alias=True,
    )

    # The run
    num_server_rounds: int = Field(5, ge=1)
    strategy: Literal[STRATEGIES] = DEFAULT_STRATEGY
    model_id: Literal[tuple(MODELS)] = "mlp-90k"
    seed: int = Field(0, ge=0, lt=2**63)
    resume_run: str = Field("", pattern=r"^(\d{1,20})?$")  # a store run id: continue from its last round
    # The devices' training
    global_k: float = 0.1  # below 1: a fraction of the model's N; else a count
    min_k: int = Field(100, ge=1)
    max_k: int = Field(0, ge=0)  # most tracked weights a device may send; 0: the largest a profile allows
    local_epochs: int = Field(1, ge=1)
    learning_rate: Positive = 0.1
    learning_rate_schedule: Literal[LR_SCHEDULES] = "constant"
    final_learning_rate: float = 0.02
    batch_size: int = Field(32, ge=1)
    freeze_epochs: int = Field(0, ge=0)
    # The data
    partitioner: Literal[PARTITIONERS] = "dirichlet"
    alpha: Positive = 0.5
    train_subset: int = Field(0, ge=0)
    max_examples: int = Field(100_000, ge=1)
    # The wire
    value_precision: Literal[tuple(PRECISIONS)] = "fp16"
    uplink_coding: Literal[UPLINK_CODINGS] = "delta"
    uplink_precision: Literal[("", *PRECISIONS)] = ""  # "": value-precision
    downlink_coding: Literal[DOWNLINK_CODINGS] = "whole"
    downlink_grid_exponent: int = Field(-10, ge=GRID_EXPONENTS.start, lt=GRID_EXPONENTS.stop)
    max_payload_bytes: int = Field(16 * 1024 * 1024, ge=1024)
    max_abs_value: Positive = 1000.0
    # The server's merge
    aggregation: Literal[RULES] = "mean"
    trim_fraction: float = Field(0.1, ge=0, lt=0.5)
    clip_norm: float = Field(0.0, ge=0)
    server_optimizer: Literal[OPTIMIZERS] = "momentum"
    server_momentum: Fraction = 0.0
    server_learning_rate: Positive = 1.0
    server_beta1: Fraction = 0.9
    server_beta2: Fraction = 0.99
    server_tau: Positive = 0.001
    update_memory_rounds: int = Field(0, ge=0)  # 0: off; else replay a device's latest update that long
    update_memory_bytes: int = Field(256 * 1024 * 1024, ge=1)  # the memory's cap (oldest forgotten first)
    # The fleet and its rounds
    fraction_train: float = Field(1.0, gt=0, le=1)
    fraction_evaluate: float = Field(0.5, ge=0, le=1)
    min_available_nodes: int = Field(2, ge=1)
    min_train_nodes: int = Field(2, ge=1)
    max_short_rounds: int = Field(3, ge=1)
    round_timeout: Positive = 600.0
    fleet_mix: str = "mcu-512k,pi-zero-512m,pi4-4g,jetson-8g"
    # The operator's (OPERATOR_KEYS): paths travel with the run, so they reach ClientApps on every
    # machine (a Ray cluster's raylets do not pass on the environment of whoever started them);
    # "" falls back to the environment.
    results_file: str = "results/{run_id}.jsonl"
    store_url: str = ""
    fashion_mnist_dir: str = ""
    message_audit: str = ""
    # The operator's signature of the app and this config; checked before any code runs (fleet/launcher.py).
    app_signature: str = ""

    @classmethod
    def from_mapping(cls, raw: Mapping[str, Any]) -> "RunConfig":
        """Parse Flower's run config (kebab-case keys); raises `ConfigError` naming each bad key."""
        known = sorted(_kebab(n) for n in cls.model_fields)
        unknown = [f"unknown run-config key {key!r}; known: {known}" for key in raw if key not in known]
        if unknown:
            raise ConfigError("\n".join(unknown))
        try:
            return cls.model_validate(dict(raw))
        except ValidationError as exc:
            raise ConfigError(_describe(exc)) from None

    def __init__(self, **values: Any) -> None:
        try:
            super().__init__(**values)
        except ValidationError as exc:
            raise ConfigError(_describe(exc)) from None

    @model_validator(mode="before")
    @classmethod
    def _apply_recipe(cls, data: Any) -> Any:
        """Fill the recipe keys the run left unset (absent or `""`) from its strategy's recipe."""
        if not isinstance(data, Mapping):
            return data
        data = dict(data)
        strategy = _given(data, "strategy", DEFAULT_STRATEGY)
        recipe = PRESETS.get(strategy, {}) if isinstance(strategy, str) else {}
        momentum_step = _given(data, "server_optimizer", "momentum") == "momentum"
        for name in RECIPE_KEYS:
            key = next((k for k in (_kebab(name), name) if k in data), None)
            if key is not None and data[key] != "":
                continue  # set by the run: it wins
            key = key or name
            if name in recipe and (momentum_step or name not in _MOMENTUM_ONLY):
                data[key] = recipe[name]
            elif name == "uplink_precision":
                data[key] = ""  # follows value-precision
            else:
                data[key] = cls.model_fields[name].default
        return data

    @field_validator("global_k")
    @classmethod
    def _k_is_a_fraction_or_a_count(cls, value: float) -> float:
        if not (0 < value < 1 or (value >= 1 and value == int(value))):
            raise ValueError("a fraction of the model's weights (0 < k < 1) or a whole count (>= 1)")
        return value

    @model_validator(mode="after")
    def _check_combinations(self) -> "RunConfig":
        problems = list(self._combination_problems())
        if problems:
            raise ValueError("\n".join(problems))
        return self

    def _combination_problems(self) -> list[str]:
        sparse = self.strategy in SPARSE_DROPBACK
        problems = []
        if self.learning_rate_schedule == "cosine" and not (
            0 < self.final_learning_rate <= self.learning_rate
        ):
            problems.append(
                f"run-config 'final-learning-rate' has an invalid value: {self.final_learning_rate!r} "
                f"(a cosine decay heads from 'learning-rate' {self.learning_rate!r} down to it, above 0)"
            )
        largest = min(MAX_VALUE.get(p, math.inf) for p in (self.value_precision, self.uplink_values))
        if self.max_abs_value > largest:
            problems.append(
                f"run-config 'max-abs-value' has an invalid value: {self.max_abs_value!r} "
                f"(at most {largest:g} under {self.value_precision!r})"
            )
        if self.uses_server_optimizer and not sparse:
            problems.append("run-config 'server-*' keys need strategy 'dropback'")
        if self.server_optimizer != "momentum" and self.server_momentum:
            problems.append(
                f"run-config 'server-momentum' belongs to server-optimizer 'momentum'; "
                f"{self.server_optimizer!r} keeps its first moment with 'server-beta1'"
            )
        if self.update_memory_rounds and not sparse:
            problems.append("run-config 'update-memory-rounds' needs strategy 'dropback'")
        if self.uplink_coding != "delta" and not sparse:
            problems.append("run-config 'uplink-coding' other than 'delta' needs strategy 'dropback'")
        if self.downlink_coding == "delta":
            if not sparse:
                problems.append("run-config 'downlink-coding' 'delta' needs strategy 'dropback'")
            elif self.value_precision not in DELTA_LEVELS:
                problems.append(
                    f"run-config 'downlink-coding' 'delta' codes each version's change at "
                    f"{' or '.join(DELTA_LEVELS)} ('value-precision'), not {self.value_precision!r}; "
                    "for another precision set 'downlink-coding' to 'whole'"
                )
        if "ternary" in (self.value_precision, self.uplink_values) and not (
            self.strategy == "topk-ef"
            or (self.uplink_coding == "change" and self.value_precision != "ternary")
        ):
            problems.append(
                "ternary values (STC's signs at the mean magnitude) are for strategy 'topk-ef' or a "
                "DropBack uplink with 'uplink-coding' 'change'; a global tracked set holds whole deltas"
            )
        if self.resume_run and not sparse:
            problems.append(
                "run-config 'resume-run' needs strategy 'dropback' (the dense baseline keeps no checkpoint)"
            )
        return problems

    @property
    def global_k_count(self) -> int:
        """The published global tracked set's size K: `global-k` itself, or that fraction of N."""
        if self.global_k >= 1:
            return int(self.global_k)
        return max(1, round(self.global_k * num_weights(self.model_id)))

    @property
    def uplink_values(self) -> str:
        """The precision of the values devices send (`uplink-precision`, else `value-precision`)."""
        return self.uplink_precision or self.value_precision

    @property
    def uses_server_optimizer(self) -> bool:
        return (
            self.server_optimizer != "momentum" or self.server_momentum != 0 or self.server_learning_rate != 1
        )

    def learning_rate_at(self, server_round: int) -> float:
        """The devices' learning rate in a round (1-based): constant, or cosine-decayed over the run

        from `learning-rate` in round 1 toward `final-learning-rate`, which the round after the
        last would reach.
        """
        if self.learning_rate_schedule == "constant":
            return self.learning_rate
        done = min(max(server_round - 1, 0), self.num_server_rounds) / self.num_server_rounds
        span = self.learning_rate - self.final_learning_rate
        return self.final_learning_rate + span * (1 + math.cos(math.pi * done)) / 2

    def training_seed(self, server_round: int) -> int:
        """The seed of a device's local data order in a round (the same on every device)."""
        return self.seed * 1_000_003 + server_round

    @property
    def profiles(self) -> list[str]:
        return [p.strip() for p in self.fleet_mix.split(",") if p.strip()]


def _given(data: Mapping[str, Any], name: str, default: object) -> object:
    """A key's raw value under its kebab-case or Python name, else `default`."""
    return data.get(_kebab(name), data.get(name, default))


_TYPE_NAMES = {"float_type": "float", "int_type": "int", "string_type": "str", "bool_type": "bool"}


def _describe(exc: ValidationError) -> str:
    """One line per bad key, in the words of the run config (kebab-case keys, its own choices)."""
    lines = []
    for error in exc.errors(include_url=False):
        key = _kebab(str(error["loc"][0])) if error["loc"] else ""
        kind, value = error["type"], error.get("input")
        if kind == "extra_forbidden":
            known = sorted(_kebab(n) for n in RunConfig.model_fields)
            lines.append(f"unknown run-config key {key!r}; known: {known}")
        elif kind in _TYPE_NAMES or (kind.endswith("_type") and key):
            lines.append(f"run-config {key!r} must be {_TYPE_NAMES.get(kind, kind)}, got {value!r}")
        elif kind == "finite_number":
            lines.append(f"run-config {key!r} must be a finite number, got {value!r}")
        elif kind == "literal_error":
            choices = [c for c in get_args(RunConfig.model_fields[key.replace("-", "_")].annotation) if c]
            lines.append(f"run-config {key!r} has an invalid value: {value!r}; known: {', '.join(choices)}")
        elif not key:  # the cross-key rules: their own sentences
            lines.append(str(error["ctx"]["error"]) if "ctx" in error else error["msg"])
        else:
            reason = str(error["ctx"]["error"]) if kind == "value_error" else error["msg"].lower()
            lines.append(f"run-config {key!r} has an invalid value: {value!r} ({reason})")
    return "\n".join(lines)
