"""The Flower ServerApp: runs the sparse DropBack strategy (or the dense baseline)."""

import platform
from functools import cache
from importlib import metadata

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from dropfleet.common.codec import decode
from dropfleet.common.data import Split, load_fashion_mnist
from dropfleet.common.export import calibration_split
from dropfleet.common.layer_init import seeded_model
from dropfleet.common.sparse import materialize
from dropfleet.common.train import evaluate, recalibrate_batch_norm
from dropfleet.fleet.config import RunConfig
from dropfleet.fleet.records import record_payload
from dropfleet.server.checkpoint import Checkpoint, resume
from dropfleet.server.preflight import check_run
from dropfleet.server.reporting import RoundRecorder
from dropfleet.server.store import Store
from dropfleet.server.strategy import DenseFedAvg, SparseDropBack, TopKFedAvg

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
            dict(context.run_config),
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
    done = checkpoint.round if checkpoint else 0
    recorder = RoundRecorder(
        config.strategy,
        config.num_server_rounds,
        config.results_file,
        store=store,
        run_id=run_id,
        attempt=attempt,
        resumed_after=checkpoint.round if checkpoint else None,
        header=_header(run_id, attempt, config, context),
    )
    try:
        check_run(context.run_config)  # device profiles and data, before any round
        _train(grid, config, recorder, checkpoint, done)
    except BaseException as exc:
        recorder.end("failed", _reason(exc))
        raise
    else:
        recorder.end("finished")
    finally:
        recorder.close()


def _header(run_id: str, attempt: str, config: RunConfig, context: Context) -> dict[str, object]:
    versions = {name: _version(name) for name in ("dropfleet", "flwr", "torch", "numpy")}
    versions["python"] = platform.python_version()
    return {
        "run_id": run_id,
        "attempt": attempt,
        "strategy": config.strategy,
        "model_id": config.model_id,
        "seed": config.seed,
        "num_rounds": config.num_server_rounds,
        "config": dict(context.run_config),
        "versions": versions,
    }


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _train(
    grid: Grid, config: RunConfig, recorder: RoundRecorder, checkpoint: Checkpoint | None, done: int
) -> None:
    test = load_fashion_mnist("test")

    @cache
    def calibration() -> Split:
        """Training examples (never the test set) to re-estimate batch-norm statistics."""
        return calibration_split(load_fashion_mnist("train"))

    if config.strategy == "dropback":
        strategy: SparseDropBack | DenseFedAvg | TopKFedAvg = SparseDropBack(config, recorder, checkpoint)
        initial = strategy.initial_arrays()

        def to_model(arrays: ArrayRecord):  # noqa: ANN202
            model = materialize(decode(record_payload(arrays), config.max_payload_bytes))
            recalibrate_batch_norm(model, calibration())  # BN statistics do not travel
            return model
    elif config.strategy == "topk-ef":
        strategy = TopKFedAvg(config, recorder)
        initial = strategy.initial_arrays()

        def to_model(arrays: ArrayRecord):  # noqa: ANN202 (the strategy holds the dense model)
            model = seeded_model(config.model_id, config.seed)
            weights = {n: torch.from_numpy(w.copy()) for n, w in strategy.weights.items()}
            model.load_state_dict(weights, strict=False)  # parameters; BN statistics do not travel
            recalibrate_batch_norm(model, calibration())
            return model
    else:
        strategy = DenseFedAvg(config, recorder)
        initial = ArrayRecord(seeded_model(config.model_id, config.seed).state_dict())

        def to_model(arrays: ArrayRecord):  # noqa: ANN202
            model = seeded_model(config.model_id, config.seed)
            model.load_state_dict(arrays.to_torch_state_dict())
            return model

    def evaluate_on_test_set(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if checkpoint is not None and server_round == 0:
            return None  # the checkpoint's round is published already
        server_round += done
        result = evaluate(to_model(arrays), test)
        published = record_payload(arrays) if config.strategy == "dropback" else None
        recorder.finish_round(server_round, result.accuracy, result.loss, published)
        return MetricRecord({"accuracy": result.accuracy, "loss": result.loss})

    strategy.start(
        grid=grid,
        initial_arrays=initial,
        num_rounds=config.num_server_rounds - done,
        timeout=config.round_timeout,
        train_config=ConfigRecord(),
        evaluate_config=ConfigRecord(),
        evaluate_fn=evaluate_on_test_set,
    )
