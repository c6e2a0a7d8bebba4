"""The one storage module: SQLite by default (WAL), PostgreSQL by URL.

The aggregator writes; API replicas read. Each round is published in one
transaction (round row, its global model, the fleet's counters), so a crash
mid-publish leaves either all of it or none of it.
"""

import fcntl
import hashlib
import logging
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import create_engine, event, select, update
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from dropfleet.common.errors import ConfigError, StaleWriterError, StoreUnavailableError
from dropfleet.server.store.schema import Node, PublishedModel, Round, Run, ServerState

logger = logging.getLogger(__name__)
DATABASE_URL_ENV = "DROPFLEET_DATABASE_URL"
# A publish that meets a locked, full or unreachable database is retried this often, waiting
# 0.5, 1, 2, 4... s between tries (SQLite also waits up to its busy timeout inside each try).
PUBLISH_ATTEMPTS = 6
PUBLISH_BACKOFF_S = 0.5
# Postgres advisory lock key for migrations ("dropfleet" in ASCII, folded into 63 bits).
_MIGRATION_LOCK = 0x64726F70666C656574 & ((1 << 63) - 1)
STATE_DIR_ENV = "DROPFLEET_STATE_DIR"
MIGRATIONS = Path(__file__).with_name("migrations")
# Statuses of a run that may still have (or be about to get) a ServerApp.
LIVE_STATUSES = ("starting", "running")
_ROUND_FIELDS = (
    "accuracy",
    "loss",
    "fed_accuracy",
    "fed_loss",
    "train_loss",
    "sampled",
    "replied",
    "failed",
    "rejected",
    "bytes_up",
    "bytes_down",
    "churn",
    "replayed",
    "seconds",
)


def default_database_url() -> str:
    """$DROPFLEET_DATABASE_URL, else SQLite under $DROPFLEET_STATE_DIR (default ./state)."""
    if url := os.environ.get(DATABASE_URL_ENV):
        return url
    state = Path(os.environ.get(STATE_DIR_ENV, "state")).resolve()
    return f"sqlite:///{state / 'dropfleet.db'}"


@dataclass(frozen=True)
class NodeEvent:
    """What one node did in one round, as the aggregator saw it."""

    node_id: int
    outcome: str  # "accepted", "rejected" or "failed"
    bytes_up: int = 0
    bytes_down: int = 0
    profile: str | None = None
    partition_id: int | None = None
    budget_bytes: int | None = None
    state_bytes: int | None = None
    peak_bytes: int | None = None
    trainer: str | None = None
    k: int | None = None
    process_rss_bytes: int | None = None
    board_rss_bytes: int | None = None
    error: str | None = None


def _row(obj: Any, exclude: tuple[str, ...] = ()) -> dict[str, Any]:
    return {c.key: getattr(obj, c.key) for c in obj.__mapper__.column_attrs if c.key not in exclude}


class Store:
    def __init__(
        self,
        url: str | None = None,
        publish_attempts: int = PUBLISH_ATTEMPTS,
        publish_backoff_s: float = PUBLISH_BACKOFF_S,
        busy_timeout_ms: int = 5000,
    ) -> None:
        self.url = url or default_database_url()
        if self.url.startswith("sqlite:///"):
            Path(self.url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        self.engine: Engine = create_engine(self.url, pool_pre_ping=True)
        if self.engine.dialect.name == "sqlite":
            event.listen(self.engine, "connect", lambda conn, _record: _sqlite_pragmas(conn, busy_timeout_ms))
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        self.publish_attempts, self.publish_backoff_s = max(1, publish_attempts), publish_backoff_s

    def migrate(self) -> None:
        """Bring the schema to the latest Alembic revision, one migrating process at a time.

        The API and every ServerApp migrate at start; concurrent ones wait for each other
        (PostgreSQL: a transaction-level advisory lock; SQLite: an exclusive lock on a file
        beside the database), so none sees a half-made schema or races to create a table.
        """
        cfg = Config()
        cfg.set_main_option("script_location", str(MIGRATIONS))
        with self._migration_lock(), self.engine.begin() as conn:
            if self.engine.dialect.name == "postgresql":
                conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_MIGRATION_LOCK})")
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")

    @contextmanager
    def _migration_lock(self) -> Iterator[None]:
        path = self.url.removeprefix("sqlite:///") if self.url.startswith("sqlite:///") else None
        if path is None or path == ":memory:":
            yield
            return
        with open(f"{path}.migrate-lock", "a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def ping(self) -> bool:
        with self.engine.connect() as conn:
            conn.exec_driver_sql("SELECT 1")
        return True

    @contextmanager
    def _tx(self) -> Iterator[Session]:
        with self._sessions.begin() as session:
            yield session

    # ----- writes (the aggregator) -------------------------------------------------
    def register_run(
        self, run_id: str, strategy: str, model_id: str, seed: int, num_rounds: int, config: dict[str, Any]
    ) -> None:
        """A run submitted to the SuperLink whose ServerApp has not started yet: status "starting".

        A no-op when the ServerApp was quicker and recorded the run already.
        """
        run = Run(
            run_id=run_id,
            strategy=strategy,
            model_id=model_id,
            seed=seed,
            num_rounds=num_rounds,
            config=config,
            status="starting",
            attempt=run_id,
            resumes=0,
        )
        try:
            with self._tx() as s:
                if s.get(Run, run_id) is None:
                    s.add(run)
        except IntegrityError:
            pass  # inserted concurrently by the ServerApp

    def start_run(
        self,
        run_id: str,
        strategy: str,
        model_id: str,
        seed: int,
        num_rounds: int,
        config: dict[str, Any],
        attempt: str | None = None,
    ) -> None:
        """Record a new run (or one registered as "starting"), owned by Flower run `attempt`."""
        for _ in range(2):  # a concurrent register_run may win the insert once
            try:
                with self._tx() as s:
                    run = s.get(Run, run_id, with_for_update=True)
                    if run is None:
                        run = Run(run_id=run_id, resumes=0)
                        s.add(run)
                    elif run.status == "stopped":  # stopped over REST while its ServerApp was starting
                        raise ConfigError(f"run {run_id} was stopped before its ServerApp started")
                    run.strategy, run.model_id, run.seed = strategy, model_id, seed
                    run.num_rounds, run.config = num_rounds, config
                    run.status, run.error, run.finished_at = "running", None, None
                    run.attempt = attempt or run_id
                return
            except IntegrityError:
                continue
        raise ConfigError(f"run {run_id} could not be recorded")

    def fail_if_unfinished(self, run_id: str, attempt: str, reason: str) -> bool:
        """Mark a run failed if it is still starting/running under `attempt` (its ServerApp is gone).

        Conditional in one statement, so a ServerApp that recorded its own end first wins.
        """
        with self._tx() as s:
            done = s.execute(
                update(Run)
                .where(Run.run_id == run_id, Run.attempt == attempt, Run.status.in_(LIVE_STATUSES))
                .values(status="failed", error=reason[:2000], finished_at=datetime.now(UTC))
            )
            return bool(done.rowcount)

    def hand_over(self, run_id: str, attempt: str) -> None:
        """The API started Flower run `attempt` to resume `run_id`: it owns the run from now ("starting")."""
        with self._tx() as s:
            run = s.get(Run, run_id, with_for_update=True)
            if run is None or run.status == "finished":
                raise ConfigError(f"cannot hand run {run_id} over: it does not exist or has finished")
            run.attempt = attempt
            run.status, run.error, run.finished_at = "starting", None, None

    def take_over(self, run_id: str, attempt: str) -> None:
        """Make Flower run `attempt` the owner of `run_id`; from now on the old owner cannot publish."""
        with self._tx() as s:
            run = s.get(Run, run_id, with_for_update=True)
            if run is None:
                raise ConfigError(f"cannot resume run {run_id}: the store has no such run")
            if run.status == "finished":
                raise ConfigError(f"cannot resume run {run_id}: it has finished")
            run.attempt, run.resumes = attempt, run.resumes + 1
            run.status, run.error, run.finished_at = "running", None, None

    def publish_round(
        self,
        run_id: str,
        server_round: int,
        stats: dict[str, Any],
        model: bytes | None,
        tracked: int,
        nodes: list[NodeEvent] = (),
        attempt: str | None = None,
        server_state: bytes | None = None,
    ) -> None:
        """Round metrics, its global model, the server optimizer's state and node counters, all or nothing.

        With `attempt`, only the run's current owner may publish: a ServerApp
        that was replaced by a resumed one gets `StaleWriterError` and writes nothing.
        A locked, full or unreachable database is retried with backoff; if it stays so,
        `StoreUnavailableError` says why, and nothing of the round was written.
        """

        def write() -> None:
            now = datetime.now(UTC)
            with self._tx() as s:
                if attempt is not None:
                    run = s.get(Run, run_id, with_for_update=True)
                    if run is None or run.attempt != attempt:
                        owner = run.attempt if run else None
                        raise StaleWriterError(
                            f"run {run_id} is owned by Flower run {owner}, not {attempt}: "
                            f"round {server_round} not published"
                        )
                s.add(
                    Round(
                        run_id=run_id,
                        round=server_round,
                        tracked=tracked,
                        **{k: stats[k] for k in _ROUND_FIELDS if k in stats},
                    )
                )
                if model is not None:
                    s.add(
                        PublishedModel(
                            run_id=run_id,
                            round=server_round,
                            data=model,
                            size=len(model),
                            tracked=tracked,
                            checksum=hashlib.sha256(model).hexdigest(),
                        )
                    )
                if (
                    server_state is not None
                ):  # only the latest is kept: a resume continues from the last round
                    s.merge(ServerState(run_id=run_id, round=server_round, data=server_state))
                for ev in nodes:
                    node = s.get(Node, str(ev.node_id)) or Node(
                        node_id=str(ev.node_id),
                        rounds_joined=0,
                        failures=0,
                        rejected=0,
                        bytes_up=0,
                        bytes_down=0,
                    )
                    s.add(node)
                    node.last_seen = now
                    node.bytes_up += ev.bytes_up
                    node.bytes_down += ev.bytes_down
                    for attr in (
                        "profile",
                        "partition_id",
                        "budget_bytes",
                        "state_bytes",
                        "peak_bytes",
                        "trainer",
                        "k",
                        "process_rss_bytes",
                        "board_rss_bytes",
                    ):
                        if getattr(ev, attr) is not None:
                            setattr(node, attr, getattr(ev, attr))
                    if ev.outcome == "accepted":
                        node.rounds_joined += 1
                    elif ev.outcome == "rejected":
                        node.rejected += 1
                        node.last_error = (ev.error or "")[:2000]
                    else:
                        node.failures += 1
                        node.last_error = (ev.error or "")[:2000]

        self._with_retries(
            f"round {server_round} of run {run_id}", write, lambda: self._round_exists(run_id, server_round)
        )

    def _with_retries(self, what: str, write: Callable[[], None], written: Callable[[], bool]) -> None:
        """`write` (one transaction) again after a locked, full or unreachable database, with backoff;
        `StoreUnavailableError` once every try failed. `written` tells whether a try that lost its
        connection had committed after all."""
        for attempt_no in range(1, self.publish_attempts + 1):
            try:
                write()
                return
            except OperationalError as exc:
                reason = str(exc.orig if exc.orig is not None else exc).splitlines()[0]
                if attempt_no == self.publish_attempts:
                    raise StoreUnavailableError(
                        f"{what} not published after {attempt_no} tries: {reason}"
                    ) from None
                wait = self.publish_backoff_s * 2 ** (attempt_no - 1)
                logger.warning(
                    "Publishing %s failed (%s); try %d of %d in %.1f s",
                    what, reason, attempt_no + 1, self.publish_attempts, wait,
                )  # fmt: skip
                time.sleep(wait)
            except IntegrityError:
                if attempt_no > 1 and written():
                    return  # an earlier try committed, then lost its connection before it heard so
                raise

    def _round_exists(self, run_id: str, server_round: int) -> bool:
        with self._sessions() as s:
            return s.get(Round, (run_id, server_round)) is not None

    def finish_run(
        self, run_id: str, status: str, error: str | None = None, attempt: str | None = None
    ) -> None:
        """Close a run; with `attempt`, only if that attempt still owns it."""
        with self._tx() as s:
            run = s.get(Run, run_id)
            if run is None or (attempt is not None and run.attempt != attempt):
                return
            if not (run.status == "stopped" and status == "failed"):
                # A run stopped on request ends "stopped", not "failed" when its ServerApp is terminated.
                run.status, run.error, run.finished_at = status, error, datetime.now(UTC)

    # ----- reads (the API) -----------------------------------------------------------
    def list_runs(self) -> list[dict[str, Any]]:
        with self._sessions() as s:
            return [_row(r) for r in s.scalars(select(Run).order_by(Run.created_at.desc()))]

    def get_run(self, run_id: str) -> dict[str, Any] | None:
        with self._sessions() as s:
            run = s.get(Run, run_id)
            return _row(run) if run else None

    def rounds(self, run_id: str, after: int = -1) -> list[dict[str, Any]]:
        with self._sessions() as s:
            q = select(Round).where(Round.run_id == run_id, Round.round > after).order_by(Round.round)
            return [_row(r) for r in s.scalars(q)]

    def server_state(self, run_id: str) -> tuple[int, bytes] | None:
        """The round and bytes of the server optimizer state published last, if any."""
        with self._sessions() as s:
            row = s.get(ServerState, run_id)
            return (row.round, bytes(row.data)) if row else None

    def model(self, run_id: str, server_round: int | None = None) -> dict[str, Any] | None:
        """A published model (latest when round is None), with its bytes."""
        with self._sessions() as s:
            q = select(PublishedModel).where(PublishedModel.run_id == run_id)
            if server_round is None:
                q = q.order_by(PublishedModel.round.desc()).limit(1)
            else:
                q = q.where(PublishedModel.round == server_round)
            m = s.scalars(q).first()
            return _row(m) if m else None

    def model_rounds(self, run_id: str) -> list[int]:
        with self._sessions() as s:
            q = (
                select(PublishedModel.round)
                .where(PublishedModel.run_id == run_id)
                .order_by(PublishedModel.round)
            )
            return list(s.scalars(q))

    def nodes(self) -> list[dict[str, Any]]:
        with self._sessions() as s:
            return [_row(n) for n in s.scalars(select(Node).order_by(Node.node_id))]


def _sqlite_pragmas(dbapi_conn: Any, busy_timeout_ms: int) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
    cur.close()
