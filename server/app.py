"""The Flower ServerApp: records the run, builds its strategy (server/strategies/) and runs it.

Thin by design: the strategy meters, screens, merges and publishes; this module
owns the run's lifecycle in the store (started, resumed, finished or failed with
its reason) and the results file's header.
"""

import platform
from importlib import metadata

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from dropfleet.common.device.data import load_fashion_mnist
from dropfleet.common.device.export import calibration_split
from dropfleet.fleet.config import OPERATOR_KEYS, RunConfig
from dropfleet.server.checkpoint import Checkpoint, resume
from dropfleet.server.preflight import check_run
from dropfleet.server.reporting import RoundRecorder
from dropfleet.server.store import Store
from dropfleet.server.strategies import Evaluation, build_strategy

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    attempt = str(context.run_id)
    store = Store(str(context.run_config.get("store-url", "")) or None)
    store.migrate()
    try:
        config = RunConfig.from_mapping(context.run_config)
        checkpoint = resume(store, config, attempt) if config.resume_run else None
    except BaseException as exc:
        # A run the API registered as "starting" must not stay so (finish_run ignores unknown runs).
        store.finish_run(attempt, "failed", _reason(exc), attempt=attempt)
        raise
    run_id = checkpoint.run_id if checkpoint else attempt
    if checkpoint is None:
        store.start_run(
            run_id,
            config.strategy,
            config.model_id,
            config.seed,
            config.num_server_rounds,
            # Served to every reader (`GET /runs`): no paths, no signature.
            {k: v for k, v in context.run_config.items() if k not in OPERATOR_KEYS},
            attempt=attempt,
        )
    try:
        _serve(grid, context, config, store, run_id, attempt, checkpoint)
    except BaseException as exc:
        # Every way out but success (data missing, results file unwritable, a failed round,
        # a stop) records the run's end, so no run stays "running" without a ServerApp.
        store.finish_run(run_id, "failed", _reason(exc), attempt=attempt)
        raise
    store.finish_run(run_id, "finished", attempt=attempt)


def _reason(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:2000]


def _serve(
    grid: Grid,
    context: Context,
    config: RunConfig,
    store: Store,
    run_id: str,
    attempt: str,
    checkpoint: Checkpoint | None,
) -> None:
    recorder = RoundRecorder(
        config.strategy,
        config.num_server_rounds,
        config.results_file,
        store=store,
        run_id=run_id,
        attempt=attempt,
        resumed_after=checkpoint.round if checkpoint else None,
        header=_header(run_id, attempt, config),
    )
    try:
        check_run(context.run_config)  # device profiles and data, before any round
        _train(grid, config, recorder, checkpoint)
    except BaseException as exc:
        recorder.end("failed", _reason(exc))
        raise
    else:
        recorder.end("finished")
    finally:
        recorder.close()


def _header(run_id: str, attempt: str, config: RunConfig) -> dict[str, object]:
    versions = {name: _version(name) for name in ("dropfleet", "flwr", "torch", "numpy")}
    versions["python"] = platform.python_version()
    return {
        "run_id": run_id,
        "attempt": attempt,
        "strategy": config.strategy,
        "model_id": config.model_id,
        "seed": config.seed,
        "num_rounds": config.num_server_rounds,
        # As the run resolved it: the strategy's recipe filled in where the run config left `""`.
        "config": config.model_dump(by_alias=True),
        "versions": versions,
    }


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _train(grid: Grid, config: RunConfig, recorder: RoundRecorder, checkpoint: Checkpoint | None) -> None:
    evaluation = Evaluation(
        test=load_fashion_mnist("test", config.fashion_mnist_dir or None),
        # Training examples (never the test set) to re-estimate batch-norm statistics.
        load_calibration=lambda: calibration_split(
            load_fashion_mnist("train", config.fashion_mnist_dir or None)
        ),
    )
    build_strategy(config, recorder, evaluation, checkpoint).run(grid)
