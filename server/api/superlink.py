"""What the API asks the SuperLink, cached and single-flight, plus the run reconciler.

Each question (`flwr supernode list`, `flwr ls`) starts a `flwr` process, so no
request may start one of its own: every caller shares one in-flight query and
its answer for `superlink_cache_seconds`, and failures are cached the same way.
`dropfleet_superlink_queries` in /metrics counts the processes started.
"""

import asyncio
import time
from collections.abc import Callable
from logging import getLogger
from typing import Any

from fastapi.concurrency import run_in_threadpool
from prometheus_client import Counter

from dropfleet.common.errors import FlowerControlError
from dropfleet.server import flower_control
from dropfleet.server.api.settings import Settings
from dropfleet.server.store import Store
from dropfleet.server.store.store import LIVE_STATUSES

logger = getLogger(__name__)


class CachedQuery:
    """One shared answer per `ttl` seconds; concurrent callers wait for the same query."""

    def __init__(self, fetch: Callable[[], Any], ttl: float, counter: Callable[[], None]) -> None:
        self._fetch, self._ttl, self._count = fetch, ttl, counter
        self._lock = asyncio.Lock()
        self._value: Any = None
        self._at = -float("inf")

    def _fresh(self) -> bool:
        return time.monotonic() - self._at < self._ttl

    async def get(self) -> Any | None:
        """The SuperLink's answer, or None when it could not be asked (unreachable, refused)."""
        if self._fresh():
            return self._value
        async with self._lock:
            if self._fresh():
                return self._value
            self._count()
            try:
                value = await run_in_threadpool(self._fetch)
            except FlowerControlError as exc:
                logger.warning("SuperLink query failed: %s", exc)
                value = None
            self._value, self._at = value, time.monotonic()
            return value


class SuperLinkView:
    """The API's cached view of the SuperLink: its nodes and its runs."""

    def __init__(self, settings: Settings, queries: Counter) -> None:
        conn, env, ttl = settings.flower_connection, settings.flower_env, settings.superlink_cache_seconds

        def ask(query: Callable[[str, dict[str, str]], Any]) -> Callable[[], Any]:
            # No connection configured: nothing to ask, and nothing is started to ask it.
            return lambda: query(conn, env) if conn else None

        self.nodes = CachedQuery(ask(flower_control.list_supernodes), ttl, queries.labels("nodes").inc)
        self.runs = CachedQuery(ask(flower_control.list_runs), ttl, queries.labels("runs").inc)

    async def online(self) -> dict[str, bool] | None:
        """Node id -> online, or None when the SuperLink cannot say."""
        listed = await self.nodes.get()
        if listed is None:
            return None
        entries = listed.get("nodes", []) if isinstance(listed, dict) else listed
        return {
            str(n.get("node-id")): str(n.get("status", "")).lower() == "online"
            for n in entries
            if isinstance(n, dict)
        }

    async def run_statuses(self) -> dict[str, str] | None:
        """Flower run id -> status (e.g. "running", "finished:failed"), or None."""
        listed = await self.runs.get()
        if listed is None:
            return None
        entries = listed.get("runs", []) if isinstance(listed, dict) else []
        return {str(r.get("run-id")): str(r.get("status", "")) for r in entries if isinstance(r, dict)}


async def reconcile(store: Store, superlink: SuperLinkView) -> list[str]:
    """Mark failed every run the store thinks live whose Flower run the SuperLink reports finished.

    A ServerApp records its own end before its process exits, so a finished
    Flower run with a live store record means the ServerApp died without
    recording it; the update is conditional, so a late record still wins.
    """
    live = [r for r in await run_in_threadpool(store.list_runs) if r["status"] in LIVE_STATUSES]
    if not live:
        return []
    statuses = await superlink.run_statuses()
    if statuses is None:
        return []
    failed = []
    for run in live:
        attempt = run["attempt"] or run["run_id"]
        status = statuses.get(attempt, "")
        if status.startswith("finished"):
            reason = (
                f"its ServerApp ended without recording an outcome (SuperLink: Flower run {attempt} {status})"
            )
            if await run_in_threadpool(store.fail_if_unfinished, run["run_id"], attempt, reason):
                logger.warning("Run %s marked failed: %s", run["run_id"], reason)
                failed.append(run["run_id"])
    return failed


async def reconcile_forever(store: Store, superlink: SuperLinkView, every: float) -> None:
    while True:
        try:
            await reconcile(store, superlink)
        except Exception:  # the store may be briefly unavailable; try again next period
            logger.exception("Run reconciliation failed")
        await asyncio.sleep(every)
