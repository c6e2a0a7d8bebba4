"""Everything knowable about a run before anything starts, checked in one place.

`dropfleet simulate`, `POST /v1/runs` and the ServerApp itself call
`check_run`, so a typo is refused in a second with the same message
everywhere, instead of after a SuperLink and Ray have started (or, for a
device profile, after every round has failed on that device).
"""

from collections.abc import Mapping

from dropfleet.common.device.budget import BACKENDS
from dropfleet.common.device.data_files import check_fashion_mnist, check_partitioning, fashion_mnist_labels
from dropfleet.common.errors import BudgetError, ConfigError
from dropfleet.fleet.config import REST_REFUSED_KEYS, RunConfig
from dropfleet.fleet.profiles import get_profile, plan_training


def check_run(
    run_config: Mapping[str, object], data: bool = True, fleet_size: int | None = None
) -> RunConfig:
    """Parse and check a run config (overrides of pyproject's defaults) and what it needs.

    Raises `ConfigError` (unknown key, wrong type, bad value, unknown model,
    strategy or device profile, a fleet none of whose profiles can hold a
    training step; with `fleet_size`, more devices than the partitioner can
    give data) or `DatasetError` (data set missing; with `data`).
    """
    config = RunConfig.from_mapping(run_config)
    profiles = [get_profile(name) for name in config.profiles]
    if config.strategy != "fedavg":
        _check_some_device_can_train(config, [p.state_budget_bytes for p in profiles])
    if data:
        check_fashion_mnist(config.fashion_mnist_dir or None)
        if fleet_size is not None:
            labels = fashion_mnist_labels("train", config.fashion_mnist_dir or None)
            check_partitioning(len(labels), fleet_size, config.partitioner)
    return config


def refuse_operator_keys(run_config: Mapping[str, object]) -> None:
    """A run config from a REST caller names no path, carries no signature and resumes nothing
    (`REST_REFUSED_KEYS`; a resume goes through `POST /runs/{id}/resume`)."""
    named = sorted(set(run_config) & set(REST_REFUSED_KEYS))
    if named:
        raise ConfigError(
            f"run-config {', '.join(repr(k) for k in named)} cannot be set over REST: paths on the "
            "server and the boards and the run's signature are the operator's (pyproject.toml), and "
            "a run is resumed with POST /v1/runs/{id}/resume"
        )


def _check_some_device_can_train(config: RunConfig, budgets: list[int]) -> None:
    """A fleet where every device would refuse every round is a configuration error, not a run.

    The server cannot know how each board computes (numba's kernels or NumPy's), so a fleet
    is refused only when no profile can train with either backend."""
    reasons = []
    for budget in budgets:
        for backend in BACKENDS:
            try:
                plan_training(budget, config.model_id, config.batch_size, config.min_k, True, backend=backend)
                return
            except BudgetError as exc:
                reasons.append(str(exc))
    raise ConfigError(
        f"no device in fleet-mix can train: {reasons[0] if reasons else 'the mix is empty'}; lower "
        "batch-size or min-k, or use profiles with a larger state-budget-bytes"
    )
