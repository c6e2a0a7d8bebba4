"""The store on SQLite and on a real PostgreSQL: migrations, atomic publish, crashes, readers."""

import hashlib
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy.exc import IntegrityError

from dropfleet.common.errors import ConfigError, StoreUnavailableError
from dropfleet.server.store import Store
from dropfleet.server.store.schema import Base
from dropfleet.server.store.store import NodeEvent


def test_migrations_match_the_models_and_are_idempotent(store_url):
    store = Store(store_url)
    store.migrate()
    store.migrate()
    with store.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert diff == []


def test_publish_and_read_back(store_url):
    store = Store(store_url)
    store.migrate()
    store.start_run("1", "dropback", "mlp-90k", 7, 2, {"global-k": 100})
    store.publish_round("1", 0, {"accuracy": 0.1}, b"model-0", 0)
    store.publish_round(
        "1",
        1,
        {"accuracy": 0.5, "bytes_up": 10},
        b"model-1",
        100,
        [NodeEvent(5, "accepted", bytes_up=10, bytes_down=20, profile="pi4-4g", k=9)],
    )
    store.finish_run("1", "finished")
    assert store.get_run("1")["status"] == "finished"
    assert [r["round"] for r in store.rounds("1")] == [0, 1]
    latest = store.model("1")
    assert latest["round"] == 1 and latest["data"] == b"model-1"
    assert latest["checksum"] == hashlib.sha256(b"model-1").hexdigest()
    assert store.model("1", 0)["data"] == b"model-0" and store.model("1", 5) is None
    assert store.nodes()[0]["rounds_joined"] == 1 and store.nodes()[0]["k"] == 9


def test_a_failed_publish_changes_nothing(store_url):
    store = Store(store_url)
    store.migrate()
    store.start_run("1", "dropback", "mlp-90k", 7, 3, {})
    event = NodeEvent(5, "accepted", bytes_up=10)
    store.publish_round("1", 1, {"accuracy": 0.5}, b"first", 10, [event])
    with pytest.raises(IntegrityError):  # the same round twice: the whole transaction rolls back
        store.publish_round("1", 1, {"accuracy": 0.9}, b"second", 10, [event])
    assert store.model("1", 1)["data"] == b"first"
    assert store.rounds("1")[0]["accuracy"] == 0.5
    assert store.nodes()[0]["rounds_joined"] == 1 and store.nodes()[0]["bytes_up"] == 10


WRITER = """
import sys
from dropfleet.server.store import Store
store = Store(sys.argv[1])
store.start_run("9", "dropback", "mlp-90k", 0, 10**6, {})
payload = bytes(range(256)) * 8192  # 2 MiB per model: a publish takes a while
r = 0
while True:
    store.publish_round("9", r, {"accuracy": 0.5}, payload + r.to_bytes(4, "little"), r)
    r += 1
    print(r, flush=True)
"""


def test_kill_9_mid_publish_leaves_no_round_without_its_model(store_url, tmp_path):
    Store(store_url).migrate()
    writer = subprocess.Popen([sys.executable, "-c", WRITER, store_url], stdout=subprocess.PIPE, text=True)
    for _ in range(3):  # let it publish a few rounds, then kill it in the middle of another
        writer.stdout.readline()
    time.sleep(0.05)
    writer.send_signal(signal.SIGKILL)
    writer.wait(10)
    store = Store(store_url)
    rounds = {r["round"] for r in store.rounds("9")}
    models = set(store.model_rounds("9"))
    assert len(rounds) >= 3 and rounds == models
    for r in models:
        m = store.model("9", r)
        assert hashlib.sha256(m["data"]).hexdigest() == m["checksum"] and m["size"] == len(m["data"])


def test_readers_never_see_torn_writes(store_url):
    store = Store(store_url)
    store.migrate()
    store.start_run("3", "dropback", "mlp-90k", 0, 100, {})
    stop, problems, reads = threading.Event(), [], [0]

    def reader():
        mine = Store(store_url)
        while not stop.is_set():
            # Models first: a round and its model commit together, so every model seen
            # here must have its round in the later read.
            models = set(mine.model_rounds("3"))
            rounds = {r["round"] for r in mine.rounds("3")}
            latest = mine.model("3")
            if latest is not None and hashlib.sha256(latest["data"]).hexdigest() != latest["checksum"]:
                problems.append("torn model")
            if not models <= rounds:
                problems.append(f"model without round: {models - rounds}")
            reads[0] += 1

    threads = [threading.Thread(target=reader) for _ in range(3)]
    for t in threads:
        t.start()
    for r in range(40):
        store.publish_round(
            "3", r, {"accuracy": r / 40}, os.urandom(50_000), r, [NodeEvent(1, "accepted", bytes_up=1)]
        )
    stop.set()
    for t in threads:
        t.join()
    assert problems == [] and reads[0] > 10
    assert store.nodes()[0]["rounds_joined"] == 40


def test_every_integer_a_reply_may_carry_fits_its_column(store_url):
    """Device facts are accepted up to 2**62 (fleet/replies.py): they must publish on PostgreSQL too."""
    from dropfleet.fleet.replies import MAX_COUNT

    store = Store(store_url)
    store.migrate()
    store.start_run("9", "dropback", "mlp-90k", 7, 1, {})
    big = NodeEvent(
        5, "accepted", bytes_up=MAX_COUNT, partition_id=MAX_COUNT, k=MAX_COUNT, budget_bytes=MAX_COUNT
    )
    store.publish_round("9", 1, {"accuracy": 0.5}, b"m", 2**40, [big])
    node = store.nodes()[0]
    assert node["k"] == node["partition_id"] == node["bytes_up"] == MAX_COUNT
    assert store.rounds("9")[0]["tracked"] == 2**40


def test_a_registered_run_is_taken_by_its_serverapp_whichever_comes_first(store_url):
    store = Store(store_url)
    store.migrate()
    store.register_run("1", "dropback", "mlp-90k", 0, 3, {"seed": 0})
    assert store.get_run("1")["status"] == "starting"
    store.start_run("1", "dropback", "mlp-90k", 0, 3, {"seed": 0, "num-server-rounds": 3})
    assert (
        store.get_run("1")["status"] == "running" and store.get_run("1")["config"]["num-server-rounds"] == 3
    )
    store.start_run("2", "dropback", "mlp-90k", 0, 3, {})
    store.register_run("2", "dropback", "mlp-90k", 0, 3, {})  # the ServerApp was quicker: nothing changes
    assert store.get_run("2")["status"] == "running"
    # The reconciler's update is conditional: only a live run of that very attempt fails.
    assert not store.fail_if_unfinished("2", "999", "gone")
    store.finish_run("2", "finished")
    assert not store.fail_if_unfinished("2", "2", "gone") and store.get_run("2")["status"] == "finished"
    assert store.fail_if_unfinished("1", "1", "gone") and store.get_run("1")["error"] == "gone"


def test_a_run_stopped_while_starting_stays_stopped(store_url):
    """A stop over REST before the ServerApp took the run: the ServerApp must not revive it."""
    store = Store(store_url)
    store.migrate()
    store.register_run("3", "dropback", "mlp-90k", 0, 3, {})
    store.finish_run("3", "stopped")
    with pytest.raises(ConfigError, match="stopped before its ServerApp started"):
        store.start_run("3", "dropback", "mlp-90k", 0, 3, {})
    store.finish_run("3", "failed", "terminated", attempt="3")  # the ServerApp's own way out
    assert store.get_run("3")["status"] == "stopped"


def _lock_sqlite(path, seconds: float) -> subprocess.Popen:
    """Another process holding SQLite's write lock on `path` for `seconds` (as a busy writer would)."""
    code = (
        "import sqlite3, sys, time\n"
        "c = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
        "c.execute('BEGIN EXCLUSIVE')\n"
        "print('locked', flush=True)\n"
        "time.sleep(float(sys.argv[2]))\n"
        "c.execute('COMMIT')\n"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", code, str(path), str(seconds)], stdout=subprocess.PIPE, text=True
    )
    assert holder.stdout.readline().strip() == "locked"
    return holder


def test_a_publish_that_meets_a_locked_store_retries_then_fails_with_the_reason(tmp_path):
    db = tmp_path / "store.db"
    store = Store(f"sqlite:///{db}", publish_attempts=4, publish_backoff_s=0.2, busy_timeout_ms=100)
    store.migrate()
    store.start_run("1", "dropback", "mlp-90k", 7, 3, {})
    # Locked for a moment: the publish waits it out and lands, once.
    holder = _lock_sqlite(db, 0.5)
    store.publish_round("1", 0, {"accuracy": 0.1}, b"model-0", 0, [NodeEvent(5, "accepted", bytes_up=3)])
    holder.wait(10)
    assert [r["round"] for r in store.rounds("1")] == [0] and store.nodes()[0]["bytes_up"] == 3
    # Locked for longer than every retry: the reason, and nothing of the round written.
    holder = _lock_sqlite(db, 8)
    try:
        started = time.monotonic()
        with pytest.raises(StoreUnavailableError, match="not published after 4 tries: database is locked"):
            store.publish_round("1", 1, {"accuracy": 0.5}, b"model-1", 1, [NodeEvent(5, "accepted")])
        assert time.monotonic() - started >= 0.2 + 0.4 + 0.8  # it backed off between tries
    finally:
        holder.kill()
        holder.wait(10)
    assert [r["round"] for r in store.rounds("1")] == [0] and store.model("1", 1) is None
    assert store.nodes()[0]["rounds_joined"] == 1


MIGRATOR = """
import sys
from dropfleet.server.store import Store
Store(sys.argv[1]).migrate()
print("migrated")
"""


def test_concurrent_migrations_wait_for_each_other(store_url):
    """The API and every ServerApp migrate at start: started together on an empty database,
    each one finishes, and the schema is exactly the models'."""
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", MIGRATOR, store_url],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-800:] for _, err in outs]
    store = Store(store_url)
    with store.engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []
