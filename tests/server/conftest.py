"""Store fixtures: every store test runs on SQLite and on a real PostgreSQL server."""

import os
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

import pytest

from dropfleet.server.store import Store
from tests.server import postgres


@pytest.fixture(scope="session")
def postgres_url():
    tmp = Path(tempfile.mkdtemp(prefix="dropfleet-pg-", dir="/tmp"))
    os.chmod(tmp, 0o755)
    try:
        url, proc = postgres.start(tmp)
    except (FileNotFoundError, subprocess.CalledProcessError, OSError) as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        pytest.skip(f"no PostgreSQL server can be started here: {exc}")
    yield url
    os.killpg(proc.pid, signal.SIGINT)  # PostgreSQL's fast shutdown, through runuser
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
    shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'store.db'}"
    url = request.getfixturevalue("postgres_url")
    # A fresh schema per test: drop everything the previous test left.
    store = Store(url)
    with store.engine.begin() as conn:
        conn.exec_driver_sql("DROP SCHEMA public CASCADE; CREATE SCHEMA public;")
    store.engine.dispose()
    return url
