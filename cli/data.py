"""`dropfleet partition`: one node's partition of Fashion-MNIST as a board's own data (`train.npz`).

A lean board (node config `runtime = "lean"`) trains only on its own data,
never importing the partitioner's `datasets`. For the demo, the operator cuts
each board's slice here, with the partitioner the simulation uses, and copies
the file to the board's `data-dir`.
"""

from pathlib import Path
from typing import Annotated

import typer

from dropfleet.cli.output import exit_with
from dropfleet.common.errors import DropfleetError


def partition(
    out: Annotated[Path, typer.Option(help="directory to write train.npz into (created)")],
    partition_id: Annotated[int, typer.Option(help="this board's partition")] = 0,
    num_partitions: Annotated[int, typer.Option(help="partitions the fleet's data is cut into")] = 10,
    partitioner: Annotated[str, typer.Option(help="dirichlet (non-IID by label) or iid")] = "dirichlet",
    alpha: Annotated[float, typer.Option(help="Dirichlet concentration (smaller: more skewed)")] = 0.5,
    seed: Annotated[int, typer.Option(help="the run's seed (the simulation's partitions use it)")] = 0,
) -> None:
    """Write one partition of Fashion-MNIST's training split to OUT/train.npz."""
    from dropfleet.common.device.data import save_partition

    try:
        examples = save_partition(out, partition_id, num_partitions, partitioner, alpha, seed)
    except DropfleetError as exc:
        exit_with(2, str(exc))
    typer.echo(f"{out / 'train.npz'}: {examples} examples (partition {partition_id} of {num_partitions})")
