"""Fashion-MNIST from Debian's IDX files, and flwr-datasets partitions."""

import gzip
import os
import subprocess
import sys
import tracemalloc

import numpy as np
import pytest
import torch

from dropfleet.common.data import (
    load_fashion_mnist,
    partition_indices,
    read_idx,
    read_idx_rows,
)
from dropfleet.common.errors import ConfigError, DatasetError


def test_real_test_split(fmnist_test):
    assert fmnist_test.images.shape == (10000, 1, 28, 28)
    assert np.bincount(fmnist_test.labels.numpy()).tolist() == [1000] * 10
    assert abs(float(fmnist_test.images.mean())) < 0.1


def test_user_directory_and_missing_files(tmp_path, monkeypatch):
    with pytest.raises(DatasetError, match="dataset-fashion-mnist"):
        load_fashion_mnist("test", tmp_path)
    images = np.arange(2 * 28 * 28, dtype=np.uint8).reshape(2, 28, 28)
    header = bytes([0, 0, 8, 3]) + b"".join(int(d).to_bytes(4, "big") for d in images.shape)
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(header + images.tobytes())
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(
        gzip.compress(bytes([0, 0, 8, 1]) + (2).to_bytes(4, "big") + bytes([3, 9]))
    )
    monkeypatch.setenv("DROPFLEET_DATA_DIR", str(tmp_path))
    split = load_fashion_mnist("test")
    assert split.labels.tolist() == [3, 9] and split.images.shape == (2, 1, 28, 28)
    with pytest.raises(ConfigError):
        load_fashion_mnist("validation")


def test_idx_rejects_bad_files():
    with pytest.raises(DatasetError):
        read_idx(b"\x00\x00\x0d\x01")
    with pytest.raises(DatasetError, match="header says"):
        read_idx(bytes([0, 0, 8, 1]) + (5).to_bytes(4, "big") + b"\x01")


def test_dirichlet_partitions_are_deterministic_disjoint_and_skewed(fmnist_test):
    labels = fmnist_test.labels.numpy()
    parts = [partition_indices(labels, 10, i, "dirichlet", alpha=0.5, seed=0) for i in range(10)]
    assert parts[3].tolist() == partition_indices(labels, 10, 3, "dirichlet", 0.5, 0).tolist()
    joined = np.concatenate(parts)
    assert np.unique(joined).size == joined.size == labels.size
    skew = [np.bincount(labels[p], minlength=10).max() / max(p.size, 1) for p in parts]
    assert max(skew) > 0.25  # label-skewed, unlike IID's ~0.1
    other_seed = partition_indices(labels, 10, 3, "dirichlet", 0.5, seed=1)
    assert other_seed.tolist() != parts[3].tolist()


def test_iid_partitions_and_bad_arguments(fmnist_test):
    labels = fmnist_test.labels.numpy()
    part = partition_indices(labels, 4, 1, "iid")
    assert part.size == 2500
    with pytest.raises(ConfigError):
        partition_indices(labels, 4, 4, "iid")
    with pytest.raises(ConfigError):
        partition_indices(labels, 4, 0, "pathological")
    with pytest.raises(ConfigError):
        partition_indices(labels, 4, 0, "dirichlet", alpha=0.0)


def test_hub_dataset_offline_gives_a_clear_error(tmp_path):
    # A fresh process: the Hugging Face libraries read their offline switches when imported.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path)}
    code = (
        "from dropfleet.common.data import load_hf_partition\n"
        "from dropfleet.common.errors import DatasetError\n"
        "try:\n    load_hf_partition('ylecun/mnist', 0, 10)\n"
        "except DatasetError as exc:\n    print(exc)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert "Hugging Face data set 'ylecun/mnist' is not available" in done.stdout, done.stderr[-2000:]


def test_a_partition_is_read_in_chunks_with_a_small_peak(fmnist_test):
    rows = np.random.default_rng(1).choice(10_000, 300, replace=False)
    tracemalloc.start()
    part = load_fashion_mnist("test", indices=rows)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert torch.equal(part.images, fmnist_test.images[torch.from_numpy(rows)])
    assert torch.equal(part.labels, fmnist_test.labels[torch.from_numpy(rows)])
    assert peak < 4 * 2**20  # one 1 MiB chunk and 300 images, not the 7.8 MB of all 10k


def test_reading_rows_refuses_bad_indices_and_truncated_files(tmp_path):
    header = bytes([0, 0, 8, 3]) + (5).to_bytes(4, "big") + (2).to_bytes(4, "big") + (2).to_bytes(4, "big")
    (tmp_path / "ok-idx3-ubyte.gz").write_bytes(gzip.compress(header + bytes(range(20))))
    got = read_idx_rows(tmp_path / "ok-idx3-ubyte", np.array([4, 0, 4]))
    assert got.tolist() == [[[16, 17], [18, 19]], [[0, 1], [2, 3]], [[16, 17], [18, 19]]]
    with pytest.raises(DatasetError, match="out of range"):
        read_idx_rows(tmp_path / "ok-idx3-ubyte", np.array([5]))
    (tmp_path / "short-idx3-ubyte").write_bytes(header + bytes(range(19)))
    with pytest.raises(DatasetError, match="truncated"):
        read_idx_rows(tmp_path / "short-idx3-ubyte", np.array([0]))
    (tmp_path / "long-idx3-ubyte").write_bytes(header + bytes(range(21)))
    with pytest.raises(DatasetError, match="data after"):
        read_idx_rows(tmp_path / "long-idx3-ubyte", np.array([0]))
