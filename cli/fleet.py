"""`dropfleet fleet up|status|restart|down`: the process fleet on 127.0.0.1."""

import json
from pathlib import Path
from typing import Annotated

import typer

from dropfleet.cli.output import AsJson, StateDir, console, exit_with, profile_list
from dropfleet.common.errors import DropfleetError

app = typer.Typer(help="The process fleet: the compose topology as local processes.", no_args_is_help=True)


@app.command("up")
def up(
    nodes: Annotated[int, typer.Option(help="SuperNodes to start")] = 4,
    profiles: Annotated[str, typer.Option(help="device profiles, assigned round robin")] = (
        "mcu-512k,pi-zero-512m,pi4-4g,jetson-8g"
    ),
    tls: Annotated[bool, typer.Option(help="TLS between SuperNodes and the SuperLink")] = True,
    node_auth: Annotated[bool, typer.Option(help="only registered SuperNodes may connect")] = True,
    dev: Annotated[
        bool,
        typer.Option(
            "--dev", help="a development fleet: allows --no-tls / --no-node-auth, runs unsigned apps"
        ),
    ] = False,
    streaming: Annotated[
        bool,
        typer.Option(help="devices stream even when their budget holds the dense step"),
    ] = False,
    runtime: Annotated[
        str,
        typer.Option(
            help="torch: boards train on their partitions with torch; lean: NumPy alone, each on its "
            "partition cut into its own data-dir, as a board without torch trains"
        ),
    ] = "torch",
    superlink_port: Annotated[
        int, typer.Option(help="the published port (the proxy: Fleet API only)")
    ] = 8000,
    control_port: Annotated[
        int, typer.Option(help="the SuperLink itself on 127.0.0.1 (0: published port + 1)")
    ] = 0,
    api_port: Annotated[int, typer.Option(help="REST API port")] = 8080,
    node_port_base: Annotated[
        int, typer.Option(help="runtime API port of SuperNode 0 (then +1, +2...)")
    ] = 9100,
    state_dir: StateDir = Path(".fleet"),
    as_json: AsJson = False,
) -> None:
    """Start SuperLink, SuperExecs, SuperNodes and the API on 127.0.0.1 and wait until healthy."""
    from dropfleet.deploy.fleet import up as fleet_up
    from dropfleet.deploy.topology import FleetSpec

    spec = FleetSpec(
        nodes=nodes,
        profiles=profile_list(profiles),
        tls=tls,
        node_auth=node_auth,
        streaming=streaming,
        runtime=runtime,
        superlink_port=superlink_port,
        control_port=control_port,
        api_port=api_port,
        node_port_base=node_port_base,
        state_dir=state_dir,
        dev=dev,
    )
    try:
        info = fleet_up(spec)
    except DropfleetError as exc:
        exit_with(1, str(exc))
    if as_json:
        typer.echo(json.dumps(info))
        return
    guards = (
        "TLS, node auth, signed apps only"
        if not dev
        else "DEVELOPMENT: "
        + ", ".join(
            [
                f"TLS {'on' if tls else 'off'}",
                f"node auth {'on' if node_auth else 'off'}",
                "unsigned apps run",
            ]
        )
    )
    console.print(f"fleet up: {nodes} SuperNode(s), published {info['superlink']} ({guards})")
    console.print(f"  boards get  {info['app_signer']} and the CA certificate beside it")
    console.print(f"  API         {info['api']}   (admin token in {info['admin_token_file']})")
    console.print(f"  operator    FLWR_HOME={info['flwr_home']} flwr ls {info['connection']} (loopback)")
    console.print(f"  store       {info['database_url']}")
    console.print(f"  logs        {info['logs']}")


@app.command("status")
def status(state_dir: StateDir = Path(".fleet"), as_json: AsJson = False) -> None:
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


@app.command("restart")
def restart(
    names: Annotated[
        list[str] | None, typer.Argument(help="processes to restart (default: every one that died)")
    ] = None,
    state_dir: StateDir = Path(".fleet"),
) -> None:
    """Restart fleet processes, as a supervisor would: the SuperLink keeps its database."""
    from dropfleet.deploy.fleet import restart as fleet_restart

    try:
        restarted = fleet_restart(state_dir, names)
    except DropfleetError as exc:
        exit_with(1, str(exc))
    console.print(
        f"restarted {len(restarted)} process(es)" + (f": {', '.join(restarted)}" if restarted else "")
    )


@app.command("register-node")
def register_node(
    public_keys: Annotated[
        list[Path], typer.Argument(help="each board's node_key.pub (install.sh created it)")
    ],
    state_dir: StateDir = Path(".fleet"),
    flwr_home: Annotated[
        Path | None, typer.Option(help="the operator's Flower home (default: the fleet's, in --state-dir)")
    ] = None,
) -> None:
    """Let boards join: register their public keys with the fleet (only registered boards connect)."""
    from dropfleet.deploy.fleet import register_node as register

    home = flwr_home or state_dir / "flwr"
    if not (home / "config.toml").exists():
        exit_with(1, f"no Flower connection in {home} (is the fleet up? give --state-dir or --flwr-home)")
    for key in public_keys:
        try:
            new = register(home, key)
        except DropfleetError as exc:
            exit_with(1, str(exc))
        console.print(f"{key}: {'registered' if new else 'registered already'}")


@app.command("down")
def down(state_dir: StateDir = Path(".fleet")) -> None:
    """Stop exactly what `fleet up` started."""
    from dropfleet.deploy.fleet import down as fleet_down

    stopped = fleet_down(state_dir)
    console.print(f"stopped {len(stopped)} process(es)" + (f": {', '.join(stopped)}" if stopped else ""))
