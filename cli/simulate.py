"""`dropfleet simulate`: `flwr run .` on Flower's Simulation Engine, checked first, judged by its results.

It prints its own lines only: the run, one line per round (read from the results
file as the ServerApp writes it) and where the results went. Flower's, Ray's
and the ServerApp's output goes to a log beside the results file (`--verbose`:
also to the screen, as `flwr run` prints it); a failure shows the log's tail.
"""

import json
import os
from pathlib import Path
from typing import Annotated, NoReturn

import typer

from dropfleet.cli.output import console, exit_with
from dropfleet.common.device.data_files import DATA_DIR_ENV
from dropfleet.common.errors import ConfigError, DatasetError
from dropfleet.common.model.registry import MODELS
from dropfleet.fleet.config import STRATEGIES
from dropfleet.fleet.flower_env import PROJECT_ROOT
from dropfleet.server.preflight import check_run
from dropfleet.server.reporting import read_results, round_line
from dropfleet.server.simulation import check_ray_cluster, log_tail, run_simulation


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
    verbose: Annotated[
        bool,
        typer.Option(
            "--verbose", "-v", help="show Flower's and Ray's output live (it always goes to the run's log)"
        ),
    ] = False,
) -> None:
    """Train on Flower's Simulation Engine (`flwr run .`) and print each round.

    Flower's and Ray's output goes to a log beside the results file (RESULTS with
    the suffix .log). Exits 0 only when the run finished; otherwise non-zero with
    the reason on the last line, after the log's last lines.
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
    table = RoundTable(template, log_path_for(template), nodes, show_rounds=not verbose)
    sim = run_simulation(
        nodes,
        run_config,
        flwr_home.resolve(),
        ray_address=ray_address,
        federation=federation or (),
        log_file=table.log_template,
        echo=verbose,
        on_output=table.update,
    )
    table.poll()  # the rounds written after flwr's last line
    if sim.run_id is None:
        fail(sim.code or 1, "flwr run did not start a run", sim.log, show_tail=not verbose)
    path = Path(template.replace("{run_id}", sim.run_id))
    end = read_results(path)["end"] if path.exists() else None
    if end is None:
        fail(1, f"run {sim.run_id} ended without recording an outcome in {path}", sim.log, not verbose)
    if end["status"] != "finished":
        fail(1, f"run {sim.run_id} {end['status']}: {end['error']}", sim.log, show_tail=not verbose)
    console.print(f"run {sim.run_id} finished; results in {path}")


def log_path_for(results: str) -> str:
    """The run's log beside its results file: the same name with the suffix .log (`{run_id}` kept)."""
    path = Path(results)
    log = path.with_suffix(".log")
    return str(log if log != path else path.with_name(path.name + ".flwr.log"))  # never the results


class RoundTable:
    """The run's lines: where its log is once the run starts, then each round as the results file gets it.

    Reads the results file from where it ended before this run (a run appends
    to a file it shares), only whole lines, on each line of Flower's output.
    """

    def __init__(self, template: str, log_template: str, nodes: int, show_rounds: bool) -> None:
        self.template, self.log_template = template, log_template
        self.nodes, self.show_rounds = nodes, show_rounds
        self.path: Path | None = None
        fixed = Path(template)
        self.offset = fixed.stat().st_size if "{run_id}" not in template and fixed.is_file() else 0

    def update(self, _line: str, run_id: str | None) -> None:
        if run_id is None:
            return
        if self.path is None:
            self.path = Path(self.template.replace("{run_id}", run_id))
            log = self.log_template.replace("{run_id}", run_id)
            console.print(
                f"run {run_id} started on {self.nodes} simulated devices; Flower's and Ray's log: {log}"
            )
        self.poll()

    def poll(self) -> None:
        if not self.show_rounds or self.path is None:
            return
        try:
            with self.path.open("rb") as fh:
                fh.seek(self.offset)
                chunk = fh.read()
        except FileNotFoundError:
            return  # the ServerApp has not written its header yet
        whole = chunk.rfind(b"\n") + 1  # a line still being written waits for the next poll
        self.offset += whole
        for raw in chunk[:whole].splitlines():
            try:
                line = json.loads(raw)
            except ValueError:
                continue
            if isinstance(line, dict) and line.get("type") == "round":
                console.print(round_line(line))


def fail(code: int, reason: str, log: Path | None, show_tail: bool = True) -> NoReturn:
    """Exit with `reason` naming the run's log, after the log's last lines (unless they were shown live)."""
    if log is not None:
        tail = log_tail(log) if show_tail else []
        if tail:
            typer.echo(f"the last lines of {log}:", err=True)
            for line in tail:
                typer.echo(f"  {line}", err=True)
        reason = f"{reason} (Flower's and Ray's output: {log})"
    exit_with(code, reason)


def parse_value(value: str) -> object:
    """A `-c key=value` value as the run config types it: int, float, else string."""
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return value
