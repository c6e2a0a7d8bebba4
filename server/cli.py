"""The `dropfleet` command line: simulate, run a process fleet, serve the API, and query it."""

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.table import Column, Table

from dropfleet.common.errors import ConfigError, DatasetError, DropfleetError
from dropfleet.common.models import MODELS
from dropfleet.fleet.config import STRATEGIES
from dropfleet.fleet.flower_env import PROJECT_ROOT
from dropfleet.server.api_client import ApiClient, ApiError
from dropfleet.server.preflight import check_run
from dropfleet.server.reporting import read_results
from dropfleet.server.simulation import run_simulation

if TYPE_CHECKING:
    from dropfleet.common.sparse import SparseModel

app = typer.Typer(help="dropfleet: federated DropBack on Flower.", no_args_is_help=True)


@app.callback()
def _main() -> None:
    """Federated on-device training with DropBack."""


@app.command()
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
        run_config[key] = _parse_value(value)
    if nodes < 1:
        _exit(2, f"--nodes must be at least 1, got {nodes}")
    try:
        check_run(run_config)  # before any SuperLink or Ray starts
    except (ConfigError, DatasetError) as exc:
        _exit(2, str(exc))
    sim = run_simulation(nodes, run_config, flwr_home.resolve())
    if sim.run_id is None:
        _exit(sim.code or 1, "flwr run did not start a run (see its output above)")
    path = Path(template.replace("{run_id}", sim.run_id))
    end = read_results(path)["end"] if path.exists() else None
    if end is None:
        _exit(1, f"run {sim.run_id} ended without recording an outcome in {path}")
    if end["status"] != "finished":
        _exit(1, f"run {sim.run_id} {end['status']}: {end['error']}")
    console.print(f"run {sim.run_id} finished; results in {path}")


def _exit(code: int, reason: str) -> NoReturn:
    typer.echo(f"error: {reason}", err=True)
    raise typer.Exit(code)


@app.command()
def api(
    host: Annotated[str, typer.Option(help="interface to bind")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port to bind")] = 8080,
) -> None:
    """Serve the REST API and status page (settings from DROPFLEET_* variables)."""
    import uvicorn

    from dropfleet.server.api.app import create_app

    uvicorn.run(create_app(), host=host, port=port, log_level="info")


ApiUrl = Annotated[str | None, typer.Option("--api", help="API URL (default: $DROPFLEET_API_URL)")]
AsJson = Annotated[bool, typer.Option("--json", help="machine-readable output")]
# Piped (no terminal to fit), tables take the width they need: ids and errors are never cut.
console = Console(highlight=False, width=None if sys.stdout.isatty() else 400)


def _client(api: str | None) -> ApiClient:
    return ApiClient(api)


def _fail(exc: ApiError) -> typer.Exit:
    typer.echo(f"error: {exc}", err=True)
    return typer.Exit(1)


def _profiles(text: str) -> tuple[str, ...]:
    """A comma-separated profile list, as `--profiles` takes it."""
    return tuple(p.strip() for p in text.split(",") if p.strip())


def _table(*headers: str) -> Table:
    """A table that folds long cells onto more lines instead of cutting them (ids stay whole)."""
    return Table(*(Column(h, overflow="fold") for h in headers))


def _pct(value: Any) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


@app.command()
def status(api: ApiUrl = None, as_json: AsJson = False) -> None:
    """Is the API ready, and how is the latest run doing?"""
    try:
        info = _client(api).status()
    except ApiError as exc:
        raise _fail(exc) from None
    if as_json:
        typer.echo(json.dumps(info, default=str))
        return
    console.print(f"API {info['api']}: {info['ready']}, {info['runs']} run(s)")
    run, last = info["latest_run"], info["latest_round"]
    if run:
        console.print(
            f"latest run {run['run_id']} ({run['strategy']}, {run['model_id']}): {run['status']}, "
            f"round {last['round'] if last else 0}/{run['num_rounds']}, "
            f"accuracy {_pct(last['accuracy'] if last else None)}"
        )


@app.command()
def runs(api: ApiUrl = None, as_json: AsJson = False) -> None:
    """List runs with their progress."""
    try:
        client = _client(api)
        items = [(r, client.rounds(r["run_id"])) for r in client.runs()]
    except ApiError as exc:
        raise _fail(exc) from None
    if as_json:
        typer.echo(json.dumps([{**r, "rounds": rs} for r, rs in items], default=str))
        return
    table = _table("run", "strategy", "model", "status", "rounds", "accuracy", "bytes up", "bytes down")
    for r, rs in items:
        last = rs[-1] if rs else None
        table.add_row(
            r["run_id"],
            r["strategy"],
            r["model_id"],
            r["status"],
            f"{max(len(rs) - 1, 0)}/{r['num_rounds']}",
            _pct(last["accuracy"] if last else None),
            f"{sum(x['bytes_up'] for x in rs):,}",
            f"{sum(x['bytes_down'] for x in rs):,}",
        )
    console.print(table)


@app.command()
def resume(
    run: Annotated[str, typer.Argument(help="run id")],
    force: Annotated[
        bool, typer.Option(help="stop the previous attempt first if the SuperLink still lists it")
    ] = False,
    api: ApiUrl = None,
    as_json: AsJson = False,
) -> None:
    """Continue a run whose ServerApp died, from its last published round ($DROPFLEET_TOKEN)."""
    try:
        started = _client(api).resume(run, force)
    except ApiError as exc:
        raise _fail(exc) from None
    if as_json:
        typer.echo(json.dumps(started))
    else:
        console.print(f"run {started['run_id']} resumed as Flower run {started['attempt']}")


@app.command()
def model(
    run: Annotated[str, typer.Option("--run", help="run id")],
    out: Annotated[Path, typer.Option("--out", help="file to write")],
    round: Annotated[int | None, typer.Option("--round", help="default: the latest")] = None,
    format: Annotated[
        str,
        typer.Option(
            "--format",
            help="protobuf: the sparse wire bytes (proto/sparse_model.proto); pt: a torch state_dict; "
            "onnx: an ONNX graph (input image [batch,1,28,28], output logits)",
        ),
    ] = "protobuf",
    api: ApiUrl = None,
    as_json: AsJson = False,
) -> None:
    """Download a published global model, as its sparse bytes or as a dense PyTorch / ONNX model."""
    from dropfleet.common.codec import decode
    from dropfleet.common.export import FORMATS

    if format not in FORMATS:
        _exit(2, f"--format must be one of {', '.join(FORMATS)}, got {format!r}")
    try:
        data, headers = _client(api).model_bytes(run, round)
    except ApiError as exc:
        raise _fail(exc) from None
    decoded = decode(data)  # never write bytes that do not decode
    if format == "protobuf":
        out.write_bytes(data)
    else:
        try:
            _export_dense(decoded, out, format)
        except DropfleetError as exc:
            _exit(1, str(exc))
    info = {
        "run_id": run,
        "round": int(headers.get("x-dropfleet-round", -1)),
        "file": str(out),
        "format": format,
        "bytes": out.stat().st_size,
        "k": decoded.num_tracked,
        "seed": decoded.seed,
        "model_id": decoded.model_id,
    }
    if as_json:
        typer.echo(json.dumps(info))
    else:
        console.print(
            f"wrote {out} ({format}): run {run} round {info['round']}, {decoded.model_id}, "
            f"seed {decoded.seed}, {decoded.num_tracked:,} tracked weights, {info['bytes']:,} bytes"
        )


def _export_dense(decoded: "SparseModel", out: Path, format: str) -> None:
    from dropfleet.common.data import load_fashion_mnist
    from dropfleet.common.export import (
        calibration_split,
        dense_model,
        export_onnx,
        export_state_dict,
        has_batch_norm,
    )
    from dropfleet.common.models import build_model

    calibration = (
        calibration_split(load_fashion_mnist("train"))
        if has_batch_norm(build_model(decoded.model_id))
        else None
    )
    model = dense_model(decoded, calibration)
    (export_state_dict if format == "pt" else export_onnx)(model, out)


@app.command()
def nodes(api: ApiUrl = None, as_json: AsJson = False) -> None:
    """List the nodes that took part."""
    try:
        items = _client(api).nodes()
    except ApiError as exc:
        raise _fail(exc) from None
    if as_json:
        typer.echo(json.dumps(items, default=str))
        return
    table = _table("node", "profile", "k", "rounds", "failures", "rejected", "bytes up", "last error")
    for n in items:
        table.add_row(
            n["node_id"],
            n["profile"] or "-",
            str(n["k"] or "-"),
            str(n["rounds_joined"]),
            str(n["failures"]),
            str(n["rejected"]),
            f"{n['bytes_up']:,}",
            (n["last_error"] or "")[:200],
        )
    console.print(table)


fleet_app = typer.Typer(
    help="The process fleet: the compose topology as local processes.", no_args_is_help=True
)
app.add_typer(fleet_app, name="fleet")
StateDir = Annotated[Path, typer.Option(help="where PID files, logs, certificates and the store live")]


@fleet_app.command("up")
def fleet_up(
    nodes: Annotated[int, typer.Option(help="SuperNodes to start")] = 4,
    profiles: Annotated[str, typer.Option(help="device profiles, assigned round robin")] = (
        "mcu-256k,pi-zero-512m,pi4-4g,jetson-8g"
    ),
    tls: Annotated[bool, typer.Option(help="TLS between SuperNodes and the SuperLink")] = True,
    node_auth: Annotated[bool, typer.Option(help="only registered SuperNodes may connect")] = False,
    streaming: Annotated[
        bool, typer.Option(help="devices keep only the tracked set (streaming DropBack)")
    ] = False,
    superlink_port: Annotated[int, typer.Option(help="SuperLink HTTP API port")] = 8000,
    api_port: Annotated[int, typer.Option(help="REST API port")] = 8080,
    node_port_base: Annotated[
        int, typer.Option(help="runtime API port of SuperNode 0 (then +1, +2...)")
    ] = 9100,
    state_dir: StateDir = Path(".fleet"),
    as_json: AsJson = False,
) -> None:
    """Start SuperLink, SuperExecs, SuperNodes and the API on 127.0.0.1 and wait until healthy."""
    from dropfleet.common.errors import DropfleetError
    from dropfleet.deploy.fleet import up
    from dropfleet.deploy.topology import FleetSpec

    spec = FleetSpec(
        nodes=nodes,
        profiles=_profiles(profiles),
        tls=tls,
        node_auth=node_auth,
        streaming=streaming,
        superlink_port=superlink_port,
        api_port=api_port,
        node_port_base=node_port_base,
        state_dir=state_dir,
    )
    try:
        info = up(spec)
    except DropfleetError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    if as_json:
        typer.echo(json.dumps(info))
        return
    console.print(
        f"fleet up: {nodes} SuperNode(s), SuperLink {info['superlink']} (TLS {'on' if tls else 'off'})"
    )
    console.print(f"  API         {info['api']}   (admin token in {info['admin_token_file']})")
    console.print(f"  flwr        FLWR_HOME={info['flwr_home']} flwr run . {info['connection']}")
    console.print(f"  store       {info['database_url']}")
    console.print(f"  logs        {info['logs']}")


@fleet_app.command("status")
def fleet_status(state_dir: StateDir = Path(".fleet"), as_json: AsJson = False) -> None:
    """Which fleet processes are running."""
    from dropfleet.deploy.fleet import status as fleet_state

    state = fleet_state(state_dir)
    if as_json:
        typer.echo(json.dumps(state))
        return
    if not state:
        console.print("no fleet")
    for name, alive in state.items():
        console.print(f"{name:<24} {'running' if alive else 'stopped'}")


@fleet_app.command("restart")
def fleet_restart(
    names: Annotated[
        list[str] | None, typer.Argument(help="processes to restart (default: every one that died)")
    ] = None,
    state_dir: StateDir = Path(".fleet"),
) -> None:
    """Restart fleet processes, as a supervisor would: the SuperLink keeps its database."""
    from dropfleet.common.errors import DropfleetError
    from dropfleet.deploy.fleet import restart

    try:
        restarted = restart(state_dir, names)
    except DropfleetError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    console.print(
        f"restarted {len(restarted)} process(es)" + (f": {', '.join(restarted)}" if restarted else "")
    )


@fleet_app.command("down")
def fleet_down(state_dir: StateDir = Path(".fleet")) -> None:
    """Stop exactly what `fleet up` started."""
    from dropfleet.deploy.fleet import down

    stopped = down(state_dir)
    console.print(f"stopped {len(stopped)} process(es)" + (f": {', '.join(stopped)}" if stopped else ""))


@app.command()
def compose(
    nodes: Annotated[int, typer.Option(help="SuperNodes in the compose fleet")] = 4,
    profiles: Annotated[str, typer.Option(help="device profiles, assigned round robin")] = (
        "mcu-256k,pi-zero-512m,pi4-4g,jetson-8g"
    ),
    tls: Annotated[bool, typer.Option(help="TLS between SuperNodes and the SuperLink")] = True,
    streaming: Annotated[
        bool, typer.Option(help="devices keep only the tracked set (streaming DropBack)")
    ] = False,
    network: Annotated[
        str, typer.Option(help="bridge: a compose network; host: every service on the host's 127.0.0.1")
    ] = "bridge",
    superlink_port: Annotated[int, typer.Option(help="SuperLink port")] = 8000,
    api_port: Annotated[int, typer.Option(help="REST API port")] = 8080,
    node_port_base: Annotated[
        int, typer.Option(help="with --network host: node i's runtime API port is this + i")
    ] = 9100,
) -> None:
    """Print a docker-compose.yml for a fleet of N SuperNodes (same topology as `fleet up`)."""
    from dropfleet.deploy.compose import render
    from dropfleet.deploy.topology import FleetSpec

    spec = FleetSpec(
        nodes=nodes,
        profiles=_profiles(profiles),
        tls=tls,
        streaming=streaming,
        superlink_port=superlink_port,
        api_port=api_port,
        node_port_base=node_port_base,
    )
    spec.validate()
    typer.echo(render(spec, network), nl=False)


@app.command()
def certs(
    out: Annotated[Path, typer.Option(help="directory for ca.crt, server.pem, server.key")],
    flwr_home: Annotated[Path | None, typer.Option(help="also write a Flower connection config here")] = None,
    superlink: Annotated[str, typer.Option(help="SuperLink address for that connection")] = "superlink:8000",
    tls: Annotated[bool, typer.Option(help="create certificates (off: an insecure connection)")] = True,
) -> None:
    """Create the fleet's TLS material (the compose `certs` one-shot service runs this)."""
    from dropfleet.deploy.certs import create_certificates
    from dropfleet.deploy.topology import CONNECTION
    from dropfleet.fleet.flower_env import write_connection

    paths = (
        create_certificates(out, names=(superlink.split(":")[0], "localhost", "127.0.0.1")) if tls else None
    )
    if flwr_home is not None:
        write_connection(flwr_home, CONNECTION, superlink, paths["ca"] if paths else None, insecure=True)
    console.print(f"certificates in {out}" if paths else "TLS off: no certificates")


def _parse_value(value: str) -> object:
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return value


def main() -> None:
    app()
