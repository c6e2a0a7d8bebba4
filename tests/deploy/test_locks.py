"""The locks pin every requirement to a version and every file pip may take to its SHA-256."""

import re
from pathlib import Path

from dropfleet.deploy.locks import INDEX_EXCLUDED, _file_version, client_lock, records

ROOT = Path(__file__).resolve().parents[2]
HASH = re.compile(r"^\s+--hash=sha256:[0-9a-f]{64}( \\)?$")


def test_every_requirement_is_pinned_with_hashes():
    for name in ("requirements.lock", "requirements-client.lock"):
        text = (ROOT / name).read_text()
        for record in records(text):
            assert re.match(r"^[A-Za-z0-9][A-Za-z0-9._-]*==[^\s]+ \\$", record[0]), (name, record[0])
            assert len(record) >= 2 and all(HASH.match(line) for line in record[1:]), (name, record[0])
            assert not record[-1].endswith("\\"), (name, record[0])  # the record ends there
    assert (ROOT / "requirements-client.lock").read_text() == client_lock(
        (ROOT / "requirements.lock").read_text()
    ), "run `make locks`"


def test_file_names_give_their_versions():
    assert _file_version("torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl", "torch") == "2.13.0+cpu"
    assert _file_version("SQLAlchemy-2.1.9.tar.gz", "sqlalchemy") == "2.1.9"
    assert _file_version("flwr_datasets-0.6.1-py3-none-any.whl", "flwr-datasets") == "0.6.1"
    assert _file_version("flwr-1.42.0-py3-none-any.whl", "flwr-datasets") is None  # another project
    assert _file_version("notes.txt", "torch") is None
    # PyPI's x86_64 torch (a CUDA build) is never allowed; its aarch64 CPU build is.
    assert INDEX_EXCLUDED["torch"].search("torch-2.13.0-cp311-cp311-manylinux_2_28_x86_64.whl")
    assert not INDEX_EXCLUDED["torch"].search("torch-2.13.0-cp311-cp311-manylinux_2_28_aarch64.whl")
