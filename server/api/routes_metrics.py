"""Prometheus metrics: request counters plus training gauges read from the store at scrape time."""

from collections.abc import Iterator

from fastapi import APIRouter, Depends, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from dropfleet.server.api.deps import require_read
from dropfleet.server.store import Store

router = APIRouter(tags=["metrics"], dependencies=[Depends(require_read)])


class StoreCollector(Collector):
    def __init__(self, store: Store) -> None:
        self.store = store

    def collect(self) -> Iterator[Metric]:
        runs = self.store.list_runs()
        by_status = GaugeMetricFamily("dropfleet_runs", "Runs by status", labels=["status"])
        for status in sorted({r["status"] for r in runs}):
            by_status.add_metric([status], sum(r["status"] == status for r in runs))
        yield by_status
        acc = GaugeMetricFamily(
            "dropfleet_run_accuracy", "Latest server-side test accuracy", labels=["run_id"]
        )
        rounds = GaugeMetricFamily("dropfleet_run_rounds", "Rounds completed", labels=["run_id"])
        sent = GaugeMetricFamily("dropfleet_run_bytes", "Payload bytes moved", labels=["run_id", "direction"])
        for r in runs[:50]:
            history = self.store.rounds(r["run_id"])
            done = [h for h in history if h["round"] > 0]
            rounds.add_metric([r["run_id"]], len(done))
            if history and history[-1]["accuracy"] is not None:
                acc.add_metric([r["run_id"]], history[-1]["accuracy"])
            sent.add_metric([r["run_id"], "up"], sum(h["bytes_up"] for h in history))
            sent.add_metric([r["run_id"], "down"], sum(h["bytes_down"] for h in history))
        yield acc
        yield rounds
        yield sent
        nodes = GaugeMetricFamily("dropfleet_nodes", "Nodes seen by the aggregator")
        nodes.add_metric([], len(self.store.nodes()))
        yield nodes


def make_registry(store: Store) -> tuple[CollectorRegistry, Counter, Counter]:
    """The registry, the request counter and the counter of `flwr` queries sent to the SuperLink."""
    registry = CollectorRegistry()
    registry.register(StoreCollector(store))
    requests = Counter("dropfleet_http_requests", "HTTP requests", ["method", "status"], registry=registry)
    queries = Counter(
        "dropfleet_superlink_queries",
        "flwr processes started to ask the SuperLink",
        ["query"],
        registry=registry,
    )
    return registry, requests, queries


@router.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {}}}})
def metrics(request: Request) -> Response:
    """Prometheus text exposition."""
    return Response(generate_latest(request.app.state.registry), media_type=CONTENT_TYPE_LATEST)
