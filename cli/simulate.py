"""`dropfleet simulate`: `flwr run .` on Flower's Simulation Engine, checked first, judged by its results."""

import os
from pathlib import Path
from typing import Annotated

import typer

from dropfleet.cli.output import console, exit_with
from dropfleet.common.data import DATA_DIR_ENV
from dropfleet.common.errors import ConfigError, DatasetError
from dropfleet.common.models import MODELS
from dropfleet.fleet.config import STRATEGIES
from dropfleet.fleet.flower_env import PROJECT_ROOT
from dropfleet.server.preflight import check_run
from dropfleet.server.reporting import read_results
from dropfleet.server.simulation import check_ray_cluster, run_simulation


def simulate(
    nodes: Annotated[int, typer.Option(help="simulated devices (SuperNodes)")] = 12,
    rounds: Annotated[int | None, typer.Option(help="federated rounds (default: pyproject)")] = None,
    strategy: Annotated[
        str | None, typer.Option(help=f"one of {', '.join(STRATEGIES)} (default: pyproject)")
    ] = None,
    model: Annotated[
        str | None, typer.Option(help=f"one of {', '.join(MODELS)} (default: pyproject)")
    ] = None,
    results: Annotated[
        Path | None, typer.Option(help="JSON-lines results file (default: results/RUN_ID.jsonl)")
    ] = None,
    config: Annotated[
        list[str] | None, typer.Option("--config", "-c", help="extra run-config key=value")
    ] = None,
    flwr_home: Annotated[Path, typer.Option(help="Flower home for this run")] = PROJECT_ROOT / ".flwr",
    ray_address: Annotated[
        str | None,
        typer.Option(help="HOST:PORT of a running Ray cluster to simulate on (attach, or fail)"),
    ] = None,
    federation: Annotated[
        list[str] | None,
        typer.Option(
            "--federation-config",
            help="extra Flower federation-config key=value, e.g. client-resources-num-cpus=2 "
            "or, without --ray-address, init-args-num-cpus=4",
        ),
    ] = None,
) -> None:
    """Train on Flower's Simulation Engine (`flwr run .`) and print each round.

    Exits 0 only when the run finished; otherwise non-zero with the reason on the last line.
    """
    template = str(results.resolve()) if results else str(PROJECT_ROOT / "results" / "{run_id}.jsonl")
    run_config: dict[str, object] = {"results-file": template}
    if rounds is not None:
        run_config["num-server-rounds"] = rounds
    if strategy is not None:
        run_config["strategy"] = strategy
    if model is not None:
        run_config["model-id"] = model
    for item in config or []:
        key, _, value = item.partition("=")
        run_config[key] = parse_value(value)
    if nodes < 1:
        exit_with(2, f"--nodes must be at least 1, got {nodes}")
    for item in federation or []:
        key, sep, _ = item.partition("=")
        if not sep or not key:
            exit_with(2, f"--federation-config takes key=value, got {item!r}")
        if key == "num-supernodes":
            exit_with(2, "--federation-config num-supernodes: give the fleet size with --nodes")
        if ray_address and key.startswith("init-args-"):
            exit_with(
                2,
                f"--federation-config {key} cannot be used with --ray-address: Ray refuses init "
                "arguments such as num_cpus when it attaches to an existing cluster (size the cluster "
                "with `ray start --num-cpus` instead)",
            )
    if ray_address and "fashion-mnist-dir" not in run_config and os.environ.get(DATA_DIR_ENV):
        # The environment does not reach a cluster's raylets; the run config does.
        run_config["fashion-mnist-dir"] = os.environ[DATA_DIR_ENV]
    try:
        check_run(run_config, fleet_size=nodes)  # before any SuperLink or Ray starts
        if ray_address:
            cluster = check_ray_cluster(ray_address)
            console.print(
                f"Ray cluster at {cluster.address}: {cluster.nodes} node(s), {cluster.cpus:g} CPU(s)"
            )
    except (ConfigError, DatasetError) as exc:
        exit_with(2, str(exc))
    sim = run_simulation(
        nodes, run_config, flwr_home.resolve(), ray_address=ray_address, federation=federation or ()
    )
    if sim.run_id is None:
        exit_with(sim.code or 1, "flwr run did not start a run (see its output above)")
    path = Path(template.replace("{run_id}", sim.run_id))
    end = read_results(path)["end"] if path.exists() else None
    if end is None:
        exit_with(1, f"run {sim.run_id} ended without recording an outcome in {path}")
    if end["status"] != "finished":
        exit_with(1, f"run {sim.run_id} {end['status']}: {end['error']}")
    console.print(f"run {sim.run_id} finished; results in {path}")


def parse_value(value: str) -> object:
    """A `-c key=value` value as the run config types it: int, float, else string."""
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return value
