"""A real uvicorn serving the API on 127.0.0.1, over a store filled with real protobuf models."""

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from dropfleet.common.aggregate.merge import merge_sparse
from dropfleet.common.model.sparse import SparseModel
from dropfleet.common.wire.codec import encode
from dropfleet.server.store import Store
from dropfleet.server.store.store import NodeEvent
from tests.factories import random_sparse_model
from tests.integration.procs import free_port, stop, wait_healthy

ADMIN = "admin-token-for-tests-0123456789"
READER = "reader-token-for-tests-987654321"


@dataclass
class LiveApi:
    url: str
    store: Store
    log: Path
    proc: subprocess.Popen


def random_model(k: int, seed: int) -> SparseModel:
    return random_sparse_model(k, seed)


def fill(
    store: Store,
    run_id: str = "101",
    rounds: int = 2,
    status: str = "finished",
    strategy: str = "dropback",
    num_rounds: int | None = None,
) -> list[bytes]:
    num_rounds = num_rounds or rounds
    store.start_run(run_id, strategy, "mlp-90k", 0, num_rounds, {"num-server-rounds": num_rounds})
    scale = 40 if strategy == "fedavg" else 1  # a dense run moves many more bytes
    models = [encode(SparseModel.empty("mlp-90k", 0), "fp16")]
    store.publish_round(run_id, 0, {"accuracy": 0.1, "loss": 2.3}, models[0], 0)
    for r in range(1, rounds + 1):
        merged = merge_sparse([(random_model(3000, r), 1.0), (random_model(3000, r + 50), 2.0)], 4000)
        models.append(encode(merged, "fp16"))
        events = [
            NodeEvent(
                node_id=7,
                outcome="accepted",
                bytes_up=9000,
                bytes_down=12000,
                profile="pi4-4g",
                partition_id=0,
                budget_bytes=4321580,
                state_bytes=64 + 12 * 10917,
                peak_bytes=3_650_000,
                trainer="dense",
                k=10917,
            ),
            NodeEvent(node_id=8, outcome="failed", bytes_down=12000, error="budget too small"),
        ]
        store.publish_round(
            run_id,
            r,
            {
                "accuracy": 0.5 + 0.1 * r,
                "loss": 1.0 / r,
                "sampled": 2,
                "replied": 1,
                "failed": 1,
                "bytes_up": 9000 * scale,
                "bytes_down": 24000 * scale,
                "replayed": r - 1,
                "seconds": 2.0,
            },
            models[-1],
            4000,
            events,
        )
    if status != "running":
        store.finish_run(run_id, status)
    return models


def start_api(tmp: Path, **env_extra: str) -> LiveApi:
    db = f"sqlite:///{tmp / 'api.db'}"
    store = Store(db)
    store.migrate()
    port = free_port()
    env = {
        "PATH": str(Path(sys.executable).parent),
        "DROPFLEET_DATABASE_URL": db,
        "DROPFLEET_ADMIN_TOKEN": ADMIN,
        "DROPFLEET_EVENT_POLL_SECONDS": "0.1",
        "DROPFLEET_FLOWER_CONNECTION": "nowhere",
        "DROPFLEET_FLWR_HOME": str(tmp / "flwr"),
        **env_extra,
    }
    log = tmp / "api.log"
    with log.open("w") as fh:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "uvicorn",
                "--factory",
                "dropfleet.server.api.app:create_app",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
            ],
            stdout=fh,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url + "/v1/ready", timeout=60)
    except TimeoutError:
        stop([proc])
        raise AssertionError(log.read_text()[-3000:]) from None
    return LiveApi(url, store, log, proc)
