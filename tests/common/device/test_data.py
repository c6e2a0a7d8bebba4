"""Fashion-MNIST from Debian's IDX files, and flwr-datasets partitions."""

import gzip
import io
import os
import subprocess
import sys
import tracemalloc

import numpy as np
import pytest
import torch

from dropfleet.common.device.data import load_device_data, load_fashion_mnist, partition_indices
from dropfleet.common.device.data_files import read_idx, read_idx_rows
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
        "from dropfleet.common.device.data import load_hf_partition\n"
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
    got = read_idx_rows(tmp_path / "ok-idx3-ubyte", np.array([4, 0, 4]), (2, 2))
    assert got.tolist() == [[[16, 17], [18, 19]], [[0, 1], [2, 3]], [[16, 17], [18, 19]]]
    with pytest.raises(DatasetError, match="out of range"):
        read_idx_rows(tmp_path / "ok-idx3-ubyte", np.array([5]), (2, 2))
    (tmp_path / "short-idx3-ubyte").write_bytes(header + bytes(range(19)))
    with pytest.raises(DatasetError, match="truncated"):
        read_idx_rows(tmp_path / "short-idx3-ubyte", np.array([0]), (2, 2))
    (tmp_path / "long-idx3-ubyte").write_bytes(header + bytes(range(21)))
    with pytest.raises(DatasetError, match="data after"):
        read_idx_rows(tmp_path / "long-idx3-ubyte", np.array([0]), (2, 2))


def _idx(shape: tuple[int, ...], payload: bytes = b"") -> bytes:
    return bytes([0, 0, 8, len(shape)]) + b"".join(d.to_bytes(4, "big") for d in shape) + payload


def _npz(path, **arrays) -> None:
    np.savez_compressed(path, **arrays)


IMAGES, LABELS = "train-images-idx3-ubyte", "train-labels-idx1-ubyte"
U8_28 = np.zeros((3, 28, 28), np.uint8)
PEAK = """
import resource, sys
from dropfleet.common.device.data import load_device_data
from dropfleet.common.errors import DatasetError
if sys.argv[1] != "-":
    try:
        load_device_data(sys.argv[1])
    except DatasetError:
        pass
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def _peak_kib(path) -> int:
    """Peak RSS of a fresh process that loads `path` as a device's data ("-": imports only)."""
    done = subprocess.run(
        [sys.executable, "-c", PEAK, str(path)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return int(done.stdout.split()[-1])


@pytest.fixture(scope="module")
def baseline_kib() -> int:
    return _peak_kib("-")


@pytest.mark.parametrize(
    "name, files, reason",
    [
        # A 249 KB .gz that inflates to 256 MB (all zeros) behind a header claiming 60000 x 28 x 28:
        # its header is fine, so it is read up to the 47 MB it announces, then refused for the rest.
        (
            "gzip bomb",
            {IMAGES + ".gz": ("gz-bomb", None), LABELS: _idx((2,), b"\0\1")},
            "data after the 60000 rows",
        ),
        (
            "wrong image shape",
            {
                IMAGES: _idx((2, 4096, 4096)),
                LABELS: _idx((2,), b"\0\1"),
            },
            "expected \\[n, 28, 28\\]",
        ),
        (
            "dimensions that wrap in int64",
            {IMAGES: _idx((2**31, 2**31, 2**31)), LABELS: _idx((2,))},
            "expected",
        ),
        (
            "too many rows",
            {IMAGES: _idx((2**32 - 1, 28, 28)), LABELS: _idx((2,))},
            "more than the",
        ),
        (
            "a header bigger than its file",
            {
                IMAGES: _idx((50_000, 28, 28), bytes(784)),
                LABELS: _idx((2,)),
            },
            "its header announces",
        ),
        (
            "truncated header",
            {IMAGES: bytes([0, 0, 8, 3, 0, 0]), LABELS: _idx((2,))},
            "header truncated",
        ),
        (
            "corrupt gzip",
            {IMAGES + ".gz": b"\x1f\x8b\x08garbage", LABELS: _idx((2,))},
            "unreadable",
        ),
    ],
)
def test_hostile_idx_files_are_refused_within_bounded_memory(tmp_path, baseline_kib, name, files, reason):
    for file_name, content in files.items():
        if isinstance(content, tuple):  # the bomb: built streaming, never held whole
            with gzip.open(tmp_path / file_name, "wb", compresslevel=9) as f:
                f.write(_idx((60_000, 28, 28)))
                for _ in range(256):
                    f.write(bytes(1 << 20))
        else:
            (tmp_path / file_name).write_bytes(content)
    with pytest.raises(DatasetError, match=reason):
        load_device_data(tmp_path)
    grew = (_peak_kib(tmp_path) - baseline_kib) / 1024
    assert grew < 100, f"{name}: peak RSS {grew:.0f} MiB above a bare import"  # never the inflated file


@pytest.mark.parametrize(
    "arrays, reason",
    [
        ({"images": np.zeros((3, 28, 28), np.uint8)}, "no 'labels'"),
        ({"images": np.zeros((3, 28, 28), np.float64), "labels": np.zeros(3, np.int64)}, "dtype float64"),
        (
            {"images": np.zeros((3, 32, 32), np.uint8), "labels": np.zeros(3, np.int64)},
            "expected \\[n, 28, 28\\]",
        ),
        ({"images": np.zeros((3, 28, 28), np.uint8), "labels": np.array(["a", "b", "c"])}, "dtype <U1"),
        (
            {"images": np.zeros((3, 28, 28), np.uint8), "labels": np.zeros((3, 1), np.int64)},
            "expected \\[n\\]",
        ),
    ],
)
def test_hostile_npz_files_are_refused_before_their_arrays_are_read(tmp_path, arrays, reason):
    _npz(tmp_path / "train.npz", **arrays)
    with pytest.raises(DatasetError, match=reason):
        load_device_data(tmp_path)


def test_an_npz_bomb_is_refused_without_inflating_it(tmp_path, baseline_kib):
    """A 249 KB .npz whose `images` inflate to 256 MB: its header (n x 28 x 28 uint8) is read first,
    the array only up to the size that header announces."""
    import zipfile

    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": "|u1", "fortran_order": False, "shape": (1000, 28, 28)}
    )
    with zipfile.ZipFile(tmp_path / "train.npz", "w", zipfile.ZIP_DEFLATED) as z:
        with z.open("images.npy", "w", force_zip64=True) as f:
            f.write(np.lib.format.MAGIC_PREFIX + bytes([1, 0]) + header.getvalue()[8:])
            for _ in range(256):
                f.write(bytes(1 << 20))
        z.writestr("labels.npy", _npy(np.zeros(1000, np.int64)))
    assert (tmp_path / "train.npz").stat().st_size < 1 << 20
    with pytest.raises(DatasetError, match="another size than its header"):
        load_device_data(tmp_path)
    grew = (_peak_kib(tmp_path) - baseline_kib) / 1024
    assert grew < 100, f"peak RSS {grew:.0f} MiB above a bare import"


def _npy(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    np.save(out, array)
    return out.getvalue()


def test_a_good_npz_and_idx_still_load(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (5, 28, 28), dtype=np.uint8)
    labels = np.array([0, 1, 2, 3, 9], np.int16)
    (tmp_path / "npz").mkdir()
    _npz(tmp_path / "npz" / "train.npz", images=images, labels=labels)
    got = load_device_data(tmp_path / "npz")
    assert got.labels.tolist() == labels.tolist() and got.images.shape == (5, 1, 28, 28)
    (tmp_path / "idx").mkdir()
    with gzip.open(tmp_path / "idx" / "train-images-idx3-ubyte.gz", "wb") as f:
        f.write(_idx((5, 28, 28), images.tobytes()))
    (tmp_path / "idx" / "train-labels-idx1-ubyte").write_bytes(_idx((5,), labels.astype(np.uint8).tobytes()))
    again = load_device_data(tmp_path / "idx")
    assert torch.equal(again.images, got.images) and torch.equal(again.labels, got.labels)


@pytest.mark.parametrize("compression", ["bzip2", "lzma"])
def test_an_npz_compressed_other_than_by_deflate_is_refused_before_inflating(tmp_path, compression):
    """zipfile inflates bzip2 and lzma members without a size bound: they are refused outright."""
    import zipfile

    method = {"bzip2": zipfile.ZIP_BZIP2, "lzma": zipfile.ZIP_LZMA}[compression]
    with zipfile.ZipFile(tmp_path / "train.npz", "w", method) as z:
        z.writestr("images.npy", _npy(U8_28))
        z.writestr("labels.npy", _npy(np.zeros(3, np.int64)))
    with pytest.raises(DatasetError, match="compressed other than by deflate"):
        load_device_data(tmp_path)


def test_a_saved_partition_is_a_boards_own_data(tmp_path):
    """`dropfleet partition` / a lean fleet's boards: the partition a torch node would train,
    written as a train.npz the board's reader accepts, images as stored."""
    from dropfleet.common.device.data import partition_indices, save_partition
    from dropfleet.common.device.data_files import fashion_mnist_labels, read_device_data, read_fashion_mnist

    examples = save_partition(tmp_path, 2, 5, "dirichlet", 0.5, 7)
    images, labels = read_device_data(tmp_path)
    idx = partition_indices(fashion_mnist_labels("train"), 5, 2, "dirichlet", 0.5, 7)
    expected_images, expected_labels = read_fashion_mnist("train", indices=idx)
    assert examples == len(idx) == len(labels) > 0
    assert np.array_equal(images, expected_images) and np.array_equal(labels, expected_labels)
