"""Data sets and federated partitions as the torch trainers take them, with no network needed by default.

The files are read and checked by `data_files.py` (torch-free: what the REST
API's preflight and a board without torch use); here they become normalized
float32 tensors. Hugging Face data sets (MNIST, CIFAR-10, ...) are offered
through flwr-datasets for users with internet. Partitions come from
flwr-datasets' partitioners with a fixed seed, so every node computes the
same split on its own.
"""

import os
from dataclasses import dataclass

import numpy as np
import torch

from dropfleet.common.device.data_files import (
    DIRICHLET_MIN_PARTITION,
    PARTITIONERS,
    fashion_mnist_labels,
    normalize,
    read_device_data,
    read_fashion_mnist,
)

# deploy/fleet.py reads the data check from here (it lives in the torch-free data_files.py).
from dropfleet.common.device.data_files import check_fashion_mnist as check_fashion_mnist
from dropfleet.common.errors import ConfigError, DatasetError


@dataclass(frozen=True)
class Split:
    """Images (N, 1, 28, 28) float32, normalized, and int64 labels."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, indices: np.ndarray) -> "Split":
        idx = torch.from_numpy(np.asarray(indices, dtype=np.int64))
        return Split(self.images[idx], self.labels[idx])


def load_fashion_mnist(
    split: str, data_dir: str | os.PathLike[str] | None = None, indices: np.ndarray | None = None
) -> Split:
    """The Fashion-MNIST train (60k) or test (10k) split, normalized; only `indices` if given.

    A device loads just its partition, reading the image file a chunk at a time: its
    peak is about one chunk plus its own images, not the 47 MB of all 60k.
    """
    return _normalized(*read_fashion_mnist(split, data_dir, indices))


def _normalized(images: np.ndarray, labels: np.ndarray) -> Split:
    """uint8 [n, 28, 28] images as the models take them: [n, 1, 28, 28], Fashion-MNIST's statistics."""
    return Split(torch.from_numpy(normalize(images)), torch.from_numpy(labels.astype(np.int64)))


def load_device_data(path: str | os.PathLike[str]) -> Split:
    """A device's own training data (`data_files.read_device_data`: `train.npz` or IDX files in a
    directory), its pixels normalized exactly as Fashion-MNIST's are."""
    return _normalized(*read_device_data(path))


def partition_indices(
    labels: np.ndarray | torch.Tensor,
    num_partitions: int,
    partition_id: int,
    partitioner: str = "dirichlet",
    alpha: float = 0.5,
    seed: int = 0,
) -> np.ndarray:
    """Indices of one partition, from flwr-datasets' IID or Dirichlet partitioner."""
    from datasets import Dataset  # flwr-datasets' own dependency; optional on boards
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner

    if not 0 <= partition_id < num_partitions:
        raise ConfigError(f"partition id {partition_id} not in [0, {num_partitions})")
    if partitioner == "iid":
        part = IidPartitioner(num_partitions=num_partitions)
    elif partitioner == "dirichlet":
        if not alpha > 0:
            raise ConfigError(f"Dirichlet alpha must be > 0, got {alpha}")
        part = DirichletPartitioner(
            num_partitions=num_partitions,
            partition_by="label",
            alpha=alpha,
            seed=seed,
            min_partition_size=DIRICHLET_MIN_PARTITION,
        )
    else:
        raise ConfigError(f"partitioner must be one of {PARTITIONERS}, got {partitioner!r}")
    y = np.asarray(labels, dtype=np.int64)
    part.dataset = Dataset.from_dict({"label": y, "index": np.arange(y.size)})
    return np.asarray(part.load_partition(partition_id)["index"], dtype=np.int64)


def load_hf_partition(
    name: str, partition_id: int, num_partitions: int, alpha: float = 0.5, seed: int = 0
) -> Split:
    """One Dirichlet partition of a Hugging Face image data set (needs internet)."""
    from flwr_datasets import FederatedDataset
    from flwr_datasets.partitioner import DirichletPartitioner

    part = DirichletPartitioner(num_partitions=num_partitions, partition_by="label", alpha=alpha, seed=seed)
    try:
        fds = FederatedDataset(dataset=name, partitioners={"train": part})
        ds = fds.load_partition(partition_id)
    except Exception as exc:  # network, hub, or name errors all mean "not available"
        raise DatasetError(f"Hugging Face data set {name!r} is not available: {exc}") from exc
    image_key = next(k for k in ds.column_names if k in ("image", "img"))
    images = np.stack([np.asarray(im, dtype=np.float32) / 255.0 for im in ds[image_key]])
    if images.ndim == 3:
        images = images[:, None]
    else:
        images = images.transpose(0, 3, 1, 2)
    return Split(torch.from_numpy(np.ascontiguousarray(images)), torch.tensor(ds["label"], dtype=torch.int64))


def save_partition(
    out: str | os.PathLike[str],
    partition_id: int,
    num_partitions: int,
    partitioner: str = "dirichlet",
    alpha: float = 0.5,
    seed: int = 0,
) -> int:
    """One node's partition of Fashion-MNIST's training split as a board's own data
    (`OUT/train.npz`, uint8 images as stored): what a lean board, which never imports the
    partitioner, trains on. Returns its number of examples."""
    from pathlib import Path

    idx = partition_indices(
        fashion_mnist_labels("train"), num_partitions, partition_id, partitioner, alpha, seed
    )
    images, labels = read_fashion_mnist("train", indices=idx)
    Path(out).mkdir(parents=True, exist_ok=True)
    np.savez(Path(out) / "train.npz", images=images, labels=labels.astype(np.uint8))
    return int(labels.size)
