"""A throwaway PostgreSQL server (Debian's postgresql) for the store's PostgreSQL path."""

import glob
import os
import shutil
import subprocess
import time
from pathlib import Path

from tests.integration.procs import free_port


def find_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(found[-1]).parent if found else None


def _as_postgres(cmd: list[str]) -> list[str]:
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root
        return ["runuser", "-u", "postgres", "--", *cmd]
    return cmd


def start(tmp: Path) -> tuple[str, subprocess.Popen]:
    """Start a server on a free port; returns (SQLAlchemy URL, process)."""
    bin_dir = find_bin()
    if bin_dir is None:
        raise FileNotFoundError("Debian's postgresql is not installed (apt-get install postgresql)")
    data = tmp / "pgdata"
    data.mkdir()
    if os.geteuid() == 0:
        shutil.chown(tmp, "postgres")
        shutil.chown(data, "postgres")
    subprocess.run(
        _as_postgres([str(bin_dir / "initdb"), "-D", str(data), "-U", "dropfleet", "--auth=trust"]),
        check=True,
        capture_output=True,
    )
    port = free_port()
    proc = subprocess.Popen(
        _as_postgres(
            [
                str(bin_dir / "postgres"),
                "-D",
                str(data),
                "-p",
                str(port),
                "-k",
                str(tmp),
                "-c",
                "listen_addresses=127.0.0.1",
            ]
        ),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    import psycopg

    deadline = time.monotonic() + 30
    while True:
        try:
            with psycopg.connect(
                f"host=127.0.0.1 port={port} user=dropfleet dbname=postgres", autocommit=True
            ) as conn:
                conn.execute("CREATE DATABASE dropfleet")
            break
        except psycopg.OperationalError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                raise
            time.sleep(0.2)
    return f"postgresql+psycopg://dropfleet@127.0.0.1:{port}/dropfleet", proc
