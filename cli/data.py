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
    import numpy as np

    from dropfleet.common.device.data import partition_indices
    from dropfleet.common.device.data_files import fashion_mnist_labels, read_fashion_mnist

    try:
        idx = partition_indices(
            fashion_mnist_labels("train"), num_partitions, partition_id, partitioner, alpha, seed
        )
        images, labels = read_fashion_mnist("train", indices=idx)
    except DropfleetError as exc:
        exit_with(2, str(exc))
    out.mkdir(parents=True, exist_ok=True)
    np.savez(out / "train.npz", images=images, labels=labels.astype(np.uint8))
    typer.echo(f"{out / 'train.npz'}: {len(labels)} examples (partition {partition_id} of {num_partitions})")
