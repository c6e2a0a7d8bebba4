"""The locks: requirements.lock with every file's hash, and requirements-client.lock from it (`make locks`).

`pip install --require-hashes -r requirements.lock` installs only files whose
SHA-256 the lock names: a tampered or substituted wheel on the way from the
index is refused. Hashes cover every file the index has for each pinned
version (every platform, so the same lock installs on x86_64 servers and
aarch64 boards; for torch, PyPI's CPU builds only), plus the local CPU torch
wheels pip takes from its find-links directory (`PIP_FIND_LINKS`, where a
machine keeps them: PyTorch's CPU index's files).

A client (SuperNode + ClientApp, on a board or in the slim image) needs no
Ray, no database drivers, no API server extras and no development tools
(Flower 1.42 itself needs SQLAlchemy, Alembic and tomli-w, so those stay:
hash-checking mode installs nothing the lock does not pin).
"""

import hashlib
import json
import os
import re
import sys
import urllib.request
from pathlib import Path

SERVER_OR_DEV_ONLY = frozenset(
    {
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
        "werkzeug",
    }
)
HEADER = "# Generated from requirements.lock by `make locks`: what a client (SuperNode + ClientApp) needs.\n"
INDEX = "https://pypi.org/simple"
# Index files never allowed: PyPI's x86_64 torch is a multi-GB CUDA build. Leaving its hash out
# also keeps pip on the local CPU wheel (in hash-checking mode pip prefers index files whose
# hash it knows from the link over local ones).
INDEX_EXCLUDED = {"torch": re.compile(r"x86_64|win_amd64|macosx")}
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)")


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def records(lock: str) -> list[list[str]]:
    """The lock's requirements, each with its continuation lines (`--hash=...`); comments dropped."""
    out: list[list[str]] = []
    for line in lock.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if line[0].isspace() and out:
            out[-1].append(line)
        else:
            out.append([line])
    return out


def client_lock(full: str) -> str:
    keep = [r for r in records(full) if normalize(re.split(r"[=<>~ ;\\]", r[0])[0]) not in SERVER_OR_DEV_ONLY]
    return HEADER + "".join("\n".join(r) + "\n" for r in keep)


def _file_version(filename: str, name: str) -> str | None:
    """The version a distribution file of `name` carries, from its name (wheel or sdist)."""
    stem = filename
    for ext in (".whl", ".tar.gz", ".zip", ".tar.bz2"):
        if stem.endswith(ext):
            stem = stem[: -len(ext)]
            break
    else:
        return None
    if filename.endswith(".whl"):
        parts = stem.split("-")
        return parts[1] if len(parts) >= 5 and normalize(parts[0]) == name else None
    dist, _, version = stem.rpartition("-")
    return version if normalize(dist) == name else None


def _same_version(found: str, pinned: str) -> bool:
    return found == pinned or found.split("+")[0] == pinned  # 2.13.0+cpu is torch==2.13.0


def index_hashes(name: str, version: str, index: str = INDEX) -> set[str]:
    """SHA-256 of every file the index has for `name==version` (the simple API's JSON form)."""
    request = urllib.request.Request(
        f"{index.rstrip('/')}/{name}/", headers={"Accept": "application/vnd.pypi.simple.v1+json"}
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        files = json.load(response)["files"]
    excluded = INDEX_EXCLUDED.get(name)
    return {
        f["hashes"]["sha256"]
        for f in files
        if "sha256" in f.get("hashes", {})
        and not f.get("yanked")
        and not (excluded and excluded.search(f["filename"]))
        and (v := _file_version(f["filename"], name)) is not None
        and _same_version(v, version)
    }


def local_hashes(name: str, version: str, dirs: list[Path]) -> set[str]:
    """SHA-256 of the matching files in pip's find-links directories."""
    out = set()
    for d in dirs:
        for path in sorted(d.iterdir()) if d.is_dir() else []:
            v = _file_version(path.name, name)
            if v is not None and _same_version(v, version):
                out.add(hashlib.sha256(path.read_bytes()).hexdigest())
    return out


def hashed_lock(lock: str, index: str = INDEX, find_links: list[Path] = ()) -> str:
    """`lock` with every pinned requirement followed by the hashes of its files."""
    lines = []
    for record in records(lock):
        match = PIN.match(record[0])
        if not match:
            raise SystemExit(f"not a pin: {record[0]!r}")
        name, version = normalize(match.group(1)), match.group(2)
        hashes = index_hashes(name, version, index) | local_hashes(name, version, list(find_links))
        if not hashes:
            raise SystemExit(f"no file found for {name}=={version} in {index} or {find_links}")
        pin = f"{match.group(1)}=={version}"
        lines.append(" \\\n".join([pin, *(f"    --hash=sha256:{h}" for h in sorted(hashes))]))
    return "\n".join(lines) + "\n"


def main() -> None:
    root = Path(sys.argv[1] if len(sys.argv) > 1 else ".")
    lock = root / "requirements.lock"
    if "--hash" in sys.argv:
        links = [Path(p.removeprefix("file://")) for p in os.environ.get("PIP_FIND_LINKS", "").split()]
        lock.write_text(hashed_lock(lock.read_text(), os.environ.get("DROPFLEET_INDEX", INDEX), links))
    (root / "requirements-client.lock").write_text(client_lock(lock.read_text()))


if __name__ == "__main__":
    main()
