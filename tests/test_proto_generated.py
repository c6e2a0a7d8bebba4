"""The committed generated code matches proto/sparse_model.proto."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_generated_code_is_current(tmp_path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{ROOT / 'proto'}",
            f"--python_out={tmp_path}",
            f"--pyi_out={tmp_path}",
            str(ROOT / "proto" / "sparse_model.proto"),
        ],
        check=True,
    )
    for name in ("sparse_model_pb2.py", "sparse_model_pb2.pyi"):
        assert (tmp_path / name).read_text() == (ROOT / "proto" / name).read_text(), (
            f"proto/{name} is stale: run `make proto`"
        )
