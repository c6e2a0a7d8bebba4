"""Derive requirements-client.lock from requirements.lock (`make locks`).

A client (SuperNode + ClientApp, on a board or in the slim image) needs no
Ray, no database drivers, no API server extras and no development tools.
"""

import re
import sys
from pathlib import Path

SERVER_OR_DEV_ONLY = frozenset(
    {
        "alembic",
        "backoff",
        "flatbuffers",
        "graphql-core",
        "grpcio-tools",
        "harfile",
        "hypothesis",
        "hypothesis-graphql",
        "hypothesis-jsonschema",
        "iniconfig",
        "jsonschema-rs",
        "junit-xml",
        "mako",
        "ml-dtypes",
        "onnx",
        "onnxruntime",
        "pluggy",
        "prometheus-client",
        "psycopg",
        "psycopg-binary",
        "pydantic-settings",
        "pyrate-limiter",
        "pytest",
        "pytest-subtests",
        "ray",
        "ruff",
        "schemathesis",
        "starlette-testclient",
        "tomli-w",
        "werkzeug",
    }
)
HEADER = "# Generated from requirements.lock by `make locks`: what a client (SuperNode + ClientApp) needs.\n"


def client_lock(full: str) -> str:
    keep = [
        line
        for line in full.splitlines()
        if line and re.split(r"[=<>~ ]", line)[0].lower().replace("_", "-") not in SERVER_OR_DEV_ONLY
    ]
    return HEADER + "\n".join(keep) + "\n"


def main() -> None:
    root = Path(sys.argv[1] if len(sys.argv) > 1 else ".")
    (root / "requirements-client.lock").write_text(client_lock((root / "requirements.lock").read_text()))


if __name__ == "__main__":
    main()
