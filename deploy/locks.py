"""The locks: requirements.lock with every file's hash, and the board's two locks from it (`make locks`).

`pip install --require-hashes -r requirements.lock` installs only files whose
SHA-256 the lock names: a tampered or substituted wheel on the way from the
index is refused. Hashes cover every file the index has for each pinned
version (every platform, so the same lock installs on x86_64 servers and
aarch64 boards; for torch, PyPI's CPU builds only), plus the local CPU torch
wheels pip takes from its find-links directory (`PIP_FIND_LINKS`, where a
machine keeps them: PyTorch's CPU index's files).

A board (SuperNode, SuperExec and the lean ClientApp, on a device or in the
client image) installs `requirements-client.lock`: Flower, NumPy and protobuf
with what they require, nothing else (no torch, no `datasets`, no Ray, no
numba). Flower 1.42 itself requires SQLAlchemy, Alembic, FastAPI and uvicorn,
so those stay. A board that trains on the torch runtime, and the client image
(whose simulated boards train their partitions of Fashion-MNIST), add
`requirements-torch.lock`: torch, flwr-datasets and numba with what they require
beyond the board's lock. Both are the pins of requirements.lock that the installed packages'
own metadata requires, markers evaluated for Linux on x86_64 and aarch64 with
CPython 3.11: hash-checking mode installs nothing a lock does not pin.
"""

import hashlib
import json
import os
import re
import sys
import urllib.request
from pathlib import Path

# What a board runs imports these (the lean ClientApp: client/lean.py, fleet/launcher.py).
BOARD_ROOTS = ("flwr", "numpy", "protobuf")
# The torch runtime, the partitioner a board without its own data slices Fashion-MNIST with, and
# numba's compiled w0 and top-k kernels (a few hundred MiB of board RAM, where it has that).
TORCH_ROOTS = ("torch", "flwr-datasets", "numba")
BOARD_LOCK, TORCH_LOCK = "requirements-client.lock", "requirements-torch.lock"
_GENERATED = "# Generated from requirements.lock by `make locks`: "
HEADERS = {
    BOARD_LOCK: _GENERATED + "a board (SuperNode, SuperExec, lean ClientApp).\n",
    TORCH_LOCK: _GENERATED + "a board's torch runtime, beside requirements-client.lock.\n",
}
# Where boards and images run: a requirement's marker counts if it holds on any of them.
BOARD_PLATFORMS = tuple(
    {
        "python_version": "3.11",
        "python_full_version": "3.11.2",
        "implementation_name": "cpython",
        "platform_python_implementation": "CPython",
        "os_name": "posix",
        "sys_platform": "linux",
        "platform_system": "Linux",
        "platform_machine": machine,
    }
    for machine in ("x86_64", "aarch64")
)
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


def requirement_closure(roots: tuple[str, ...]) -> set[str]:
    """The normalized names of `roots` and everything their installed metadata requires (extras
    followed), on any of BOARD_PLATFORMS."""
    from importlib.metadata import requires

    from packaging.requirements import Requirement

    seen: set[tuple[str, tuple[str, ...]]] = set()
    todo = [(root, ()) for root in roots]
    while todo:
        name, extras = todo.pop()
        if (normalize(name), extras) in seen:
            continue
        seen.add((normalize(name), extras))
        for line in requires(name) or []:
            req = Requirement(line)
            if req.marker is None or any(
                req.marker.evaluate({**platform, "extra": extra})
                for platform in BOARD_PLATFORMS
                for extra in ("", *extras)
            ):
                todo.append((req.name, tuple(sorted(req.extras))))
    return {name for name, _ in seen}


def sub_lock(full: str, names: set[str], header: str) -> str:
    """The records of `full` (a hashed lock) pinning `names`, each of which it must pin."""
    keep = {normalize(re.split(r"[=<>~ ;\\]", r[0])[0]): r for r in records(full)}
    missing = sorted(names - keep.keys())
    if missing:
        raise SystemExit(f"requirements.lock does not pin {', '.join(missing)}")
    return header + "".join("\n".join(r) + "\n" for n, r in keep.items() if n in names)


def board_locks(full: str) -> dict[str, str]:
    """The board's lock and its torch runtime's, from requirements.lock's text."""
    board = requirement_closure(BOARD_ROOTS)
    return {
        BOARD_LOCK: sub_lock(full, board, HEADERS[BOARD_LOCK]),
        TORCH_LOCK: sub_lock(full, requirement_closure(TORCH_ROOTS) - board, HEADERS[TORCH_LOCK]),
    }


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
    for name, text in board_locks(lock.read_text()).items():
        (root / name).write_text(text)


if __name__ == "__main__":
    main()
