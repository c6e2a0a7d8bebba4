"""The locks pin every requirement to a version and every file pip may take to its SHA-256."""

import re
from pathlib import Path

from dropfleet.deploy.locks import BOARD_LOCK, INDEX_EXCLUDED, TORCH_LOCK, _file_version, board_locks, records

ROOT = Path(__file__).resolve().parents[2]
HASH = re.compile(r"^\s+--hash=sha256:[0-9a-f]{64}( \\)?$")


def test_every_requirement_is_pinned_with_hashes():
    for name in ("requirements.lock", BOARD_LOCK, TORCH_LOCK):
        text = (ROOT / name).read_text()
        for record in records(text):
            assert re.match(r"^[A-Za-z0-9][A-Za-z0-9._-]*==[^\s]+ \\$", record[0]), (name, record[0])
            assert len(record) >= 2 and all(HASH.match(line) for line in record[1:]), (name, record[0])
            assert not record[-1].endswith("\\"), (name, record[0])  # the record ends there
    for name, text in board_locks((ROOT / "requirements.lock").read_text()).items():
        assert (ROOT / name).read_text() == text, "run `make locks`"


def pins(name: str) -> set[str]:
    return {record[0].split("==")[0].lower() for record in records((ROOT / name).read_text())}


def test_a_board_installs_flower_and_numpy_and_no_torch():
    board, torch = pins(BOARD_LOCK), pins(TORCH_LOCK)
    assert {"flwr", "numpy", "protobuf", "grpcio", "cryptography"} <= board
    # What the lean runtime exists to leave off a board: ~270 MiB for torch, ~190 for datasets, ~90 numba.
    assert not {"torch", "datasets", "flwr-datasets", "numba", "pandas", "pyarrow", "ray"} & board
    assert {"torch", "flwr-datasets", "numba"} <= torch and not board & torch
    assert "ray" not in torch and "pytest" not in board | torch


def test_file_names_give_their_versions():
    assert _file_version("torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl", "torch") == "2.13.0+cpu"
    assert _file_version("SQLAlchemy-2.1.9.tar.gz", "sqlalchemy") == "2.1.9"
    assert _file_version("flwr_datasets-0.6.1-py3-none-any.whl", "flwr-datasets") == "0.6.1"
    assert _file_version("flwr-1.42.0-py3-none-any.whl", "flwr-datasets") is None  # another project
    assert _file_version("notes.txt", "torch") is None
    # PyPI's x86_64 torch (a CUDA build) is never allowed; its aarch64 CPU build is.
    assert INDEX_EXCLUDED["torch"].search("torch-2.13.0-cp311-cp311-manylinux_2_28_x86_64.whl")
    assert not INDEX_EXCLUDED["torch"].search("torch-2.13.0-cp311-cp311-manylinux_2_28_aarch64.whl")
