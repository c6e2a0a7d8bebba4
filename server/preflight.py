"""Everything knowable about a run before anything starts, checked in one place.

`dropfleet simulate`, `POST /v1/runs` and the ServerApp itself call
`check_run`, so a typo is refused in a second with the same message
everywhere, instead of after a SuperLink and Ray have started (or, for a
device profile, after every round has failed on that device).
"""

from collections.abc import Mapping

from dropfleet.client.profiles import get_profile
from dropfleet.common.data import check_fashion_mnist, check_partitioning, fashion_mnist_labels
from dropfleet.fleet.config import RunConfig


def check_run(
    run_config: Mapping[str, object], data: bool = True, fleet_size: int | None = None
) -> RunConfig:
    """Parse and check a run config (overrides of pyproject's defaults) and what it needs.

    Raises `ConfigError` (unknown key, wrong type, bad value, unknown model,
    strategy or device profile; with `fleet_size`, more devices than the
    partitioner can give data) or `DatasetError` (data set missing; with `data`).
    """
    config = RunConfig.from_mapping(run_config)
    for name in config.profiles:
        get_profile(name)
    if data:
        check_fashion_mnist(config.fashion_mnist_dir or None)
        if fleet_size is not None:
            labels = fashion_mnist_labels("train", config.fashion_mnist_dir or None)
            check_partitioning(len(labels), fleet_size, config.partitioner)
    return config
