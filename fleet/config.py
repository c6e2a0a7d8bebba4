"""The run configuration, parsed once and validated with the bad key named.

Values come from `[tool.flwr.app.config]` in pyproject.toml, overridable per
run with `flwr run . --run-config "key=value ..."`.
"""

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from dropfleet.common.codec import MAX_VALUE, PRECISIONS
from dropfleet.common.data import PARTITIONERS
from dropfleet.common.downlink import DELTA_LEVELS, GRID_EXPONENTS
from dropfleet.common.errors import ConfigError
from dropfleet.common.merge import RULES
from dropfleet.common.models import MODELS
from dropfleet.common.server_opt import OPTIMIZERS
from dropfleet.common.sparse import num_weights

STRATEGIES = ("dropback", "dropback-momentum", "fedavg", "topk-ef")
SPARSE_DROPBACK = ("dropback", "dropback-momentum")
# What `strategy = "dropback-momentum"` sets wherever the run leaves these keys at their defaults:
# the levers that won the accuracy-per-byte sweep (bench/levers.py; README "Accuracy per byte").
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
# Keys only the operator sets (pyproject, `dropfleet simulate`), never a REST caller: paths on the
# server or on every board, and the run's signature, which the API computes itself. They are not
# stored with a run either (`GET /runs` would show them to every reader).
OPERATOR_KEYS = ("results-file", "store-url", "message-audit", "fashion-mnist-dir", "app-signature")
# Set by the API's resume route only (it checks the run can be taken over first).
REST_REFUSED_KEYS = (*OPERATOR_KEYS, "resume-run")
LR_SCHEDULES = ("constant", "cosine")
UPLINK_CODINGS = ("delta", "change")
DOWNLINK_CODINGS = ("whole", "delta")


@dataclass(frozen=True)
class RunConfig:
    num_server_rounds: int = 5
    strategy: str = "dropback"
    model_id: str = "mlp-90k"
    seed: int = 0
    global_k: float = 0.1  # below 1: a fraction of the model's N; else a count
    min_k: int = 100
    local_epochs: int = 1
    learning_rate: float = 0.1
    learning_rate_schedule: str = "constant"
    final_learning_rate: float = 0.02
    batch_size: int = 32
    freeze_epochs: int = 0
    partitioner: str = "dirichlet"
    alpha: float = 0.5
    value_precision: str = "fp16"
    uplink_coding: str = "delta"
    uplink_precision: str = ""
    downlink_coding: str = "whole"
    downlink_grid_exponent: int = -10
    fraction_train: float = 1.0
    fraction_evaluate: float = 0.5
    min_available_nodes: int = 2
    min_train_nodes: int = 2
    max_short_rounds: int = 3
    round_timeout: float = 600.0
    fleet_mix: str = "mcu-512k,pi-zero-512m,pi4-4g,jetson-8g"
    max_payload_bytes: int = 16 * 1024 * 1024
    max_examples: int = 100_000
    max_k: int = 0
    max_abs_value: float = 1000.0
    results_file: str = "results/{run_id}.jsonl"
    store_url: str = ""
    aggregation: str = "mean"
    trim_fraction: float = 0.1
    clip_norm: float = 0.0
    server_optimizer: str = "momentum"
    server_momentum: float = 0.0
    server_learning_rate: float = 1.0
    server_beta1: float = 0.9
    server_beta2: float = 0.99
    server_tau: float = 0.001
    update_memory_rounds: int = 0  # 0: off; else replay a device's latest update for that many rounds
    update_memory_bytes: int = 256 * 1024 * 1024  # the memory's server-wide cap (oldest forgotten first)
    train_subset: int = 0
    # Travel with the run, so they reach ClientApps on every machine (a Ray cluster's raylets
    # do not pass on the environment of whoever started them): "" falls back to the environment.
    fashion_mnist_dir: str = ""
    message_audit: str = ""
    resume_run: str = ""
    # The operator's signature of the app and this config; checked before any code runs (fleet/launcher.py).
    app_signature: str = ""

    @classmethod
    def from_mapping(cls, raw: Mapping[str, Any]) -> "RunConfig":
        """Parse Flower's run config (kebab-case keys); unknown keys are errors."""
        known = {f.name.replace("_", "-"): f for f in fields(cls)}
        values: dict[str, Any] = {}
        for key, value in raw.items():
            if key not in known:
                raise ConfigError(f"unknown run-config key {key!r}; known: {sorted(known)}")
            f = known[key]
            want = type(getattr(cls(), f.name))
            if want is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if not isinstance(value, want) or isinstance(value, bool):
                raise ConfigError(f"run-config {key!r} must be {want.__name__}, got {value!r}")
            if want is float and not math.isfinite(value):
                raise ConfigError(f"run-config {key!r} must be a finite number, got {value!r}")
            values[f.name] = value
        defaults = cls()
        for name, value in PRESETS.get(values.get("strategy", defaults.strategy), {}).items():
            momentum_only = name in ("server_momentum", "server_learning_rate")
            if momentum_only and values.get("server_optimizer", "momentum") != "momentum":
                continue  # the preset's step belongs to the momentum optimizer the run replaced
            if values.get(name, getattr(defaults, name)) == getattr(defaults, name):
                values[name] = value
        config = cls(**values)
        config.validate()
        return config

    def validate(self) -> None:
        checks = [
            ("num-server-rounds", self.num_server_rounds >= 1),
            ("strategy", self.strategy in STRATEGIES),
            ("model-id", self.model_id in MODELS),
            ("seed", 0 <= self.seed < 2**63),
            (
                "global-k",
                0 < self.global_k < 1 or (self.global_k >= 1 and self.global_k == int(self.global_k)),
            ),
            ("min-k", self.min_k >= 1),
            ("local-epochs", self.local_epochs >= 1),
            ("learning-rate", 0 < self.learning_rate < float("inf")),
            ("learning-rate-schedule", self.learning_rate_schedule in LR_SCHEDULES),
            (
                "final-learning-rate",
                self.learning_rate_schedule == "constant"
                or 0 < self.final_learning_rate <= self.learning_rate,
            ),
            ("batch-size", self.batch_size >= 1),
            ("freeze-epochs", self.freeze_epochs >= 0),
            ("partitioner", self.partitioner in PARTITIONERS),
            ("alpha", self.alpha > 0),
            ("value-precision", self.value_precision in PRECISIONS),
            ("uplink-coding", self.uplink_coding in UPLINK_CODINGS),
            ("uplink-precision", self.uplink_precision in ("", *PRECISIONS)),
            ("downlink-coding", self.downlink_coding in DOWNLINK_CODINGS),
            ("downlink-grid-exponent", self.downlink_grid_exponent in GRID_EXPONENTS),
            ("fraction-train", 0 < self.fraction_train <= 1),
            ("fraction-evaluate", 0 <= self.fraction_evaluate <= 1),
            ("min-available-nodes", self.min_available_nodes >= 1),
            ("min-train-nodes", self.min_train_nodes >= 1),
            ("max-short-rounds", self.max_short_rounds >= 1),
            ("round-timeout", self.round_timeout > 0),
            ("max-payload-bytes", self.max_payload_bytes >= 1024),
            ("max-examples", self.max_examples >= 1),
            ("max-k", self.max_k >= 0),
            (
                "max-abs-value",
                0
                < self.max_abs_value
                <= min(MAX_VALUE.get(p, math.inf) for p in (self.value_precision, self.uplink_values)),
            ),
            ("train-subset", self.train_subset >= 0),
            ("aggregation", self.aggregation in RULES),
            ("trim-fraction", 0 <= self.trim_fraction < 0.5),
            ("clip-norm", self.clip_norm >= 0),
            ("server-optimizer", self.server_optimizer in OPTIMIZERS),
            ("server-momentum", 0 <= self.server_momentum < 1),
            ("server-learning-rate", 0 < self.server_learning_rate < float("inf")),
            ("server-beta1", 0 <= self.server_beta1 < 1),
            ("server-beta2", 0 <= self.server_beta2 < 1),
            ("server-tau", 0 < self.server_tau < float("inf")),
            ("update-memory-rounds", self.update_memory_rounds >= 0),
            ("update-memory-bytes", self.update_memory_bytes >= 1),
            (
                "resume-run",
                self.resume_run == "" or (self.resume_run.isdigit() and len(self.resume_run) <= 20),
            ),
        ]
        choices = {
            "strategy": STRATEGIES,
            "model-id": tuple(MODELS),
            "partitioner": PARTITIONERS,
            "value-precision": PRECISIONS,
            "aggregation": RULES,
            "learning-rate-schedule": LR_SCHEDULES,
            "uplink-coding": UPLINK_CODINGS,
            "uplink-precision": PRECISIONS,
            "downlink-coding": DOWNLINK_CODINGS,
            "server-optimizer": OPTIMIZERS,
        }
        for key, ok in checks:
            if not ok:
                value = getattr(self, key.replace("-", "_"))
                known = f"; known: {', '.join(choices[key])}" if key in choices else ""
                raise ConfigError(f"run-config {key!r} has an invalid value: {value!r}{known}")
        if self.uses_server_optimizer and self.strategy not in SPARSE_DROPBACK:
            raise ConfigError("run-config 'server-*' keys need strategy 'dropback'")
        if self.server_optimizer != "momentum" and self.server_momentum:
            raise ConfigError(
                f"run-config 'server-momentum' belongs to server-optimizer 'momentum'; "
                f"{self.server_optimizer!r} keeps its first moment with 'server-beta1'"
            )
        if self.update_memory_rounds and self.strategy not in SPARSE_DROPBACK:
            raise ConfigError("run-config 'update-memory-rounds' needs strategy 'dropback'")
        if self.uplink_coding != "delta" and self.strategy not in SPARSE_DROPBACK:
            raise ConfigError("run-config 'uplink-coding' other than 'delta' needs strategy 'dropback'")
        if self.downlink_coding == "delta":
            if self.strategy not in SPARSE_DROPBACK:
                raise ConfigError("run-config 'downlink-coding' 'delta' needs strategy 'dropback'")
            if self.value_precision not in DELTA_LEVELS:
                raise ConfigError(
                    f"run-config 'downlink-coding' 'delta' codes each version's change at "
                    f"{' or '.join(DELTA_LEVELS)} ('value-precision'), not {self.value_precision!r}"
                )
        if "ternary" in (self.value_precision, self.uplink_values) and not (
            self.strategy == "topk-ef"
            or (self.uplink_coding == "change" and self.value_precision != "ternary")
        ):
            raise ConfigError(
                "ternary values (STC's signs at the mean magnitude) are for strategy 'topk-ef' or a "
                "DropBack uplink with 'uplink-coding' 'change'; a global tracked set holds whole deltas"
            )
        if self.resume_run and self.strategy not in SPARSE_DROPBACK:
            raise ConfigError(
                "run-config 'resume-run' needs strategy 'dropback' (the dense baseline keeps no checkpoint)"
            )

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
