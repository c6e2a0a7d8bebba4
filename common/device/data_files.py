"""The data files a device or the server reads, checked as hostile input, and the partitioning rules.

No torch and no `datasets`: the REST API's preflight and a board without
torch read from here; `data.py` turns what these readers return into the
models' input (normalized float32 images), and partitions through
flwr-datasets. Fashion-MNIST is read from the IDX files that Debian's
`dataset-fashion-mnist` package installs (or any directory holding the same
four files); a device's own data is a `train.npz` or the same IDX layout.
"""

import gzip
import math
import os
import zipfile
import zlib
from pathlib import Path
from typing import BinaryIO

import numpy as np

from dropfleet.common.errors import ConfigError, DatasetError

DEFAULT_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
DATA_DIR_ENV = "DROPFLEET_DATA_DIR"
_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
PARTITIONERS = ("iid", "dirichlet")
IMAGE_SHAPE = (28, 28)
NUM_CLASSES = 10
# flwr-datasets' Dirichlet partitioner resamples until every partition holds this many examples.
DIRICHLET_MIN_PARTITION = 10
# An IID partition needs one validation and one training example.
IID_MIN_PARTITION = 2


def fashion_mnist_dir(data_dir: str | os.PathLike[str] | None = None) -> Path:
    """Where the IDX files are: the argument, $DROPFLEET_DATA_DIR, or Debian's path."""
    return Path(data_dir or os.environ.get(DATA_DIR_ENV) or DEFAULT_FASHION_MNIST_DIR)


def check_fashion_mnist(data_dir: str | os.PathLike[str] | None = None) -> Path:
    """The data directory, if all four IDX files are there; else `DatasetError` naming what is missing."""
    root = fashion_mnist_dir(data_dir)
    for images, labels in _FILES.values():
        for name in (images, labels):
            if not (root / f"{name}.gz").exists() and not (root / name).exists():
                raise DatasetError(
                    f"Fashion-MNIST: {name}[.gz] not found in {root}. Install Debian's "
                    f"dataset-fashion-mnist package (apt-get install dataset-fashion-mnist) "
                    f"or point ${DATA_DIR_ENV} at a directory with the four IDX files."
                )
    return root


def _find(path: Path) -> Path:
    for candidate in (path.with_name(path.name + ".gz"), path):
        if candidate.exists():
            return candidate
    raise DatasetError(
        f"{path.name}[.gz] not found in {path.parent}. Install Debian's "
        f"dataset-fashion-mnist package (apt-get install dataset-fashion-mnist) "
        f"or point ${DATA_DIR_ENV} at a directory with the four IDX files."
    )


# A data file is hostile input (a board's own files, a copied data set): its header is checked
# against the shape expected and against its size before any of its payload is read, and a
# compressed file is decompressed only up to the bytes its checked header announces.
MAX_EXAMPLES = 100_000  # a device's examples: the run config's default max-examples (the server's cap)
_BAD_COMPRESSION = (OSError, EOFError, zlib.error)


def read_idx(data: bytes) -> np.ndarray:
    """Parse an IDX file held in memory (unsigned-byte payload) into an array of its shape."""
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise DatasetError("not an unsigned-byte IDX file")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DatasetError("IDX header truncated")
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = math.prod(shape) if shape else 0  # Python integers: no wrap-around
    if len(data) != header + expected:
        raise DatasetError(f"IDX payload is {len(data) - header} bytes, header says {expected}")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def _idx_header(f: BinaryIO, name: str, row_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape an IDX stream announces, checked: unsigned bytes, `[n, *row_shape]`, n bounded."""
    magic = f.read(4)
    if len(magic) < 4 or magic[:3] != b"\x00\x00\x08" or magic[3] < 1:
        raise DatasetError(f"{name}: not an unsigned-byte IDX file")
    dims = f.read(4 * magic[3])
    if len(dims) != 4 * magic[3]:
        raise DatasetError(f"{name}: IDX header truncated")
    shape = tuple(int.from_bytes(dims[4 * i : 4 * i + 4], "big") for i in range(magic[3]))
    if shape[1:] != row_shape:
        want = "[n" + "".join(f", {d}" for d in row_shape) + "]"
        raise DatasetError(f"{name}: shape {list(shape)}, expected {want}")
    if not shape[0] <= MAX_EXAMPLES:
        raise DatasetError(f"{name}: {shape[0]} rows, more than the {MAX_EXAMPLES} a data file may hold")
    return shape


def _open_idx(found: Path) -> BinaryIO:
    return gzip.open(found, "rb") if found.suffix == ".gz" else found.open("rb")  # type: ignore[return-value]


def read_idx_file(path: Path, row_shape: tuple[int, ...]) -> np.ndarray:
    """A whole IDX file (`path` or `path`.gz) of shape `[n, *row_shape]`, read within its checked size."""
    found = _find(path)
    try:
        with _open_idx(found) as f:
            shape = _idx_header(f, found.name, row_shape)
            expected = math.prod(shape)
            if found.suffix != ".gz" and found.stat().st_size != 4 + 4 * len(shape) + expected:
                raise DatasetError(
                    f"{found.name}: {found.stat().st_size} bytes, its header announces "
                    f"{4 + 4 * len(shape) + expected}"
                )
            data = f.read(expected)
            if len(data) != expected:
                raise DatasetError(f"{found.name}: truncated ({len(data)} of {expected} payload bytes)")
            if f.read(1):
                raise DatasetError(f"{found.name}: data after the {shape[0]} rows its header announces")
    except DatasetError:
        raise
    except _BAD_COMPRESSION as exc:
        raise DatasetError(f"{found.name}: unreadable ({exc})") from None
    return np.frombuffer(data, np.uint8).reshape(shape)


# Rows read at a time when only some are wanted: bounds the peak by this, not by the file.
ROW_CHUNK_BYTES = 1 << 20


def read_idx_rows(path: Path, indices: np.ndarray, row_shape: tuple[int, ...] = IMAGE_SHAPE) -> np.ndarray:
    """Rows `indices` (in that order) of an unsigned-byte IDX file of shape `[n, *row_shape]`.

    Read chunk by chunk: peak memory is one chunk plus the rows kept, never the whole
    (decompressed) file.
    """
    found = _find(path)
    try:
        with _open_idx(found) as f:
            shape = _idx_header(f, found.name, row_shape)
            return _rows(f, found.name, shape, np.asarray(indices, dtype=np.int64).reshape(-1))
    except DatasetError:
        raise
    except _BAD_COMPRESSION as exc:
        raise DatasetError(f"{found.name}: unreadable ({exc})") from None


def _rows(f: BinaryIO, name: str, shape: tuple[int, ...], idx: np.ndarray) -> np.ndarray:
    if idx.size and (int(idx.min()) < 0 or int(idx.max()) >= shape[0]):
        raise DatasetError(f"{name}: row index out of range [0, {shape[0]})")
    row = math.prod(shape[1:])
    order = np.argsort(idx, kind="stable")
    wanted = idx[order]
    out = np.empty((idx.size, *shape[1:]), np.uint8)
    step, taken = max(1, ROW_CHUNK_BYTES // max(row, 1)), 0
    for start in range(0, shape[0], step):
        n = min(step, shape[0] - start)
        chunk = f.read(n * row)
        if len(chunk) != n * row:
            raise DatasetError(f"{name}: truncated at row {start}")
        end = int(np.searchsorted(wanted, start + n))
        if end > taken:
            rows = np.frombuffer(chunk, np.uint8).reshape(n, *shape[1:])
            out[order[taken:end]] = rows[wanted[taken:end] - start]
            taken = end
    if f.read(1):
        raise DatasetError(f"{name}: data after the {shape[0]} rows its header announces")
    return out


def fashion_mnist_labels(split: str, data_dir: str | os.PathLike[str] | None = None) -> np.ndarray:
    """The labels of a Fashion-MNIST split alone (what partitioning needs), as int64."""
    if split not in _FILES:
        raise ConfigError(f"split must be 'train' or 'test', got {split!r}")
    labels = read_idx_file(fashion_mnist_dir(data_dir) / _FILES[split][1], ())
    return labels.astype(np.int64)


def read_fashion_mnist(
    split: str, data_dir: str | os.PathLike[str] | None = None, indices: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The Fashion-MNIST train (60k) or test (10k) split as stored: uint8 [n, 28, 28] images and
    int64 labels; only `indices` if given.

    A device reads just its partition, the image file a chunk at a time: its peak is
    about one chunk plus its own images, not the 47 MB of all 60k.
    """
    labels = fashion_mnist_labels(split, data_dir)
    path = fashion_mnist_dir(data_dir) / _FILES[split][0]
    if indices is not None:  # only these rows, read in chunks (a small board's peak memory)
        images, labels = read_idx_rows(path, indices), labels[indices]
    else:
        images = read_idx_file(path, IMAGE_SHAPE)
    if images.shape[0] != labels.shape[0]:
        raise DatasetError(f"inconsistent IDX shapes {images.shape} and {labels.shape}")
    return images, labels


def read_device_data(path: str | os.PathLike[str]) -> tuple[np.ndarray, np.ndarray]:
    """A device's own training data as stored (uint8 images, integer labels), checked:
    `train.npz` or IDX files in a directory.

    The format (what the registry's models take: 28x28 grey images, 10 classes):
    - `PATH/train.npz` with `images`, uint8 [n, 28, 28], and `labels`, integers in [0, 10); or
    - `PATH/train-images-idx3-ubyte[.gz]` and `PATH/train-labels-idx1-ubyte[.gz]` (Fashion-MNIST's layout).
    Raises `DatasetError` naming what is wrong.
    """
    root = Path(path)
    npz = root / "train.npz"
    if npz.exists():
        images, labels = _read_npz(npz)
    elif root.is_dir():
        img_name, lbl_name = _FILES["train"]
        images, labels = read_idx_file(root / img_name, IMAGE_SHAPE), read_idx_file(root / lbl_name, ())
    else:
        raise DatasetError(f"device data directory {root} does not exist")
    if images.dtype != np.uint8 or images.shape[1:] != IMAGE_SHAPE or images.ndim != 3:
        raise DatasetError(f"images must be uint8 [n, 28, 28], got {images.dtype} {images.shape}")
    if labels.shape != images.shape[:1] or not np.issubdtype(labels.dtype, np.integer):
        raise DatasetError(
            f"labels must be integers [n], got {labels.dtype} {labels.shape} for {len(images)} images"
        )
    if labels.size and not (0 <= int(labels.min()) and int(labels.max()) < NUM_CLASSES):
        raise DatasetError(f"labels must be in [0, {NUM_CLASSES})")
    if len(images) < 2:
        raise DatasetError(f"{root}: at least 2 examples are needed (one to train, one to validate)")
    return images, labels


def _read_npz(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """`images` and `labels` of a device's `train.npz`, each member's .npy header checked first."""
    try:
        with zipfile.ZipFile(path) as archive:
            if len(archive.infolist()) > 16:
                raise DatasetError(f"{path}: {len(archive.infolist())} members; a train.npz holds two")
            images = _npz_member(archive, "images", path.name, (np.dtype(np.uint8),), IMAGE_SHAPE)
            labels = _npz_member(archive, "labels", path.name, _LABEL_DTYPES, ())
    except DatasetError:
        raise
    except (zipfile.BadZipFile, RuntimeError, NotImplementedError, *_BAD_COMPRESSION) as exc:
        raise DatasetError(f"{path}: not a readable .npz ({exc})") from None
    return images, labels


_NPY_HEADER_MAX = 10_000
_READ_CHUNK = 1 << 20
_NPY_HEADERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
_LABEL_DTYPES = tuple(np.dtype(t) for t in (np.uint8, np.int8, np.int16, np.uint16, np.int32, np.int64))


def _npz_member(
    archive: zipfile.ZipFile,
    key: str,
    name: str,
    dtypes: tuple[np.dtype, ...],
    row_shape: tuple[int, ...],
) -> np.ndarray:
    """One array of an .npz, read only after its header says a bounded `[n, *row_shape]` of `dtypes`."""
    try:
        info = archive.getinfo(f"{key}.npy")
    except KeyError:
        raise DatasetError(f"{name}: needs arrays 'images' and 'labels' (no {key!r})") from None
    # Only stored or deflated members: zipfile inflates bzip2 and lzma without a size bound.
    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED) or info.flag_bits & 0x1:
        raise DatasetError(f"{name}: {key!r} is encrypted or compressed other than by deflate")
    if info.file_size > _NPY_HEADER_MAX + MAX_EXAMPLES * 8 * max(1, math.prod(row_shape)):
        raise DatasetError(f"{name}: {key!r} declares {info.file_size} bytes, more than a data file may hold")
    with archive.open(info) as f:
        try:
            reader = _NPY_HEADERS.get(np.lib.format.read_magic(f))
            if reader is None:
                raise ValueError("unsupported .npy format version")
            shape, fortran, dtype = reader(f, max_header_size=_NPY_HEADER_MAX)
        except ValueError as exc:
            raise DatasetError(f"{name}: {key!r} is not a .npy array ({exc})") from None
        if dtype not in dtypes or dtype.hasobject:
            allowed = [str(d) for d in dtypes]
            raise DatasetError(f"{name}: {key!r} has dtype {dtype}, expected one of {allowed}")
        if len(shape) != 1 + len(row_shape) or tuple(shape[1:]) != row_shape:
            want = "[n" + "".join(f", {d}" for d in row_shape) + "]"
            raise DatasetError(f"{name}: {key!r} has shape {list(shape)}, expected {want}")
        if not shape[0] <= MAX_EXAMPLES:
            raise DatasetError(f"{name}: {shape[0]} examples, more than the {MAX_EXAMPLES} a file may hold")
        expected = math.prod(shape) * dtype.itemsize
        # Read into the array a chunk at a time (decompressed only this far): one read() of the whole
        # member would hold it twice, its bytes and the array, on a board with little memory.
        flat = np.empty(expected, dtype=np.uint8)
        filled = 0
        while filled < expected:
            chunk = f.read(min(_READ_CHUNK, expected - filled))
            if not chunk:
                break
            flat[filled : filled + len(chunk)] = np.frombuffer(chunk, dtype=np.uint8)
            filled += len(chunk)
        if filled != expected or f.read(1):
            raise DatasetError(f"{name}: {key!r} holds another size than its header's {list(shape)}")
    array = flat.view(dtype).reshape(shape, order="F" if fortran else "C")
    return np.ascontiguousarray(array)


def check_partitioning(num_examples: int, num_partitions: int, partitioner: str) -> None:
    """Raise `ConfigError` when `num_examples` cannot give every one of `num_partitions` devices data."""
    need = DIRICHLET_MIN_PARTITION if partitioner == "dirichlet" else IID_MIN_PARTITION
    if num_partitions * need > num_examples:
        raise ConfigError(
            f"{num_partitions} devices cannot share {num_examples} training examples: the {partitioner} "
            f"partitioner needs {need} per device, so at most {num_examples // need} devices"
            + (" (partitioner=iid needs fewer)" if partitioner == "dirichlet" else "")
        )


# Per-pixel statistics of the Fashion-MNIST training set.
FMNIST_MEAN, FMNIST_STD = 0.2860, 0.3530


def normalize(images: np.ndarray) -> np.ndarray:
    """uint8 [n, 28, 28] images as the models take them: float32 [n, 1, 28, 28] with
    Fashion-MNIST's statistics (the same bits the torch and lean runtimes train on)."""
    x = images.astype(np.float32) / 255.0
    return np.ascontiguousarray(((x - FMNIST_MEAN) / FMNIST_STD)[:, None])
