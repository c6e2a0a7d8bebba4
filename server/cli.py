"""The `dropfleet` command line."""

from pathlib import Path
from typing import Annotated

import typer

from dropfleet.server.simulation import PROJECT_ROOT, run_simulation

app = typer.Typer(help="dropfleet: federated DropBack on Flower.", no_args_is_help=True)


@app.callback()
def _main() -> None:
    """Federated on-device training with DropBack."""


@app.command()
def simulate(
    nodes: Annotated[int, typer.Option(help="simulated devices (SuperNodes)")] = 12,
    rounds: Annotated[int | None, typer.Option(help="federated rounds (default: pyproject)")] = None,
    strategy: Annotated[
        str | None, typer.Option(help="dropback, or fedavg for the dense baseline (default: pyproject)")
    ] = None,
    results: Annotated[Path, typer.Option(help="JSON-lines results file")] = Path("results/run.jsonl"),
    config: Annotated[
        list[str] | None, typer.Option("--config", "-c", help="extra run-config key=value")
    ] = None,
    flwr_home: Annotated[Path, typer.Option(help="Flower home for this run")] = PROJECT_ROOT / ".flwr",
) -> None:
    """Train on Flower's Simulation Engine (`flwr run .`) and print each round."""
    run_config: dict[str, object] = {"results-file": str(results.resolve())}
    if rounds is not None:
        run_config["num-server-rounds"] = rounds
    if strategy is not None:
        run_config["strategy"] = strategy
    for item in config or []:
        key, _, value = item.partition("=")
        run_config[key] = _parse_value(value)
    raise typer.Exit(run_simulation(nodes, run_config, flwr_home.resolve()))


@app.command()
def api(
    host: Annotated[str, typer.Option(help="interface to bind")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port to bind")] = 8080,
) -> None:
    """Serve the REST API and status page (settings from DROPFLEET_* variables)."""
    import uvicorn

    from dropfleet.server.api.app import create_app

    uvicorn.run(create_app(), host=host, port=port, log_level="info")


def _parse_value(value: str) -> object:
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return value


def main() -> None:
    app()
