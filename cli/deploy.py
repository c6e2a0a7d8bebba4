"""`dropfleet compose` and `dropfleet certs`: what a container fleet is made from."""

from pathlib import Path
from typing import Annotated

import typer

from dropfleet.cli.output import console, exit_with, profile_list
from dropfleet.common.errors import DropfleetError


def compose(
    nodes: Annotated[int, typer.Option(help="SuperNodes in the compose fleet")] = 4,
    profiles: Annotated[str, typer.Option(help="device profiles, assigned round robin")] = (
        "mcu-512k,pi-zero-512m,pi4-4g,jetson-8g"
    ),
    tls: Annotated[bool, typer.Option(help="TLS between SuperNodes and the SuperLink")] = True,
    streaming: Annotated[
        bool,
        typer.Option(help="devices stream even when their budget holds the dense step"),
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
        profiles=profile_list(profiles),
        tls=tls,
        streaming=streaming,
        superlink_port=superlink_port,
        api_port=api_port,
        node_port_base=node_port_base,
    )
    try:
        spec.validate()
        text = render(spec, network)
    except DropfleetError as exc:
        exit_with(2, str(exc))
    typer.echo(text, nl=False)


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


def proxy(
    listen: Annotated[str, typer.Option(help="HOST:PORT to publish: where boards reach the fleet")],
    upstream_port: Annotated[int, typer.Option(help="the SuperLink's port on 127.0.0.1")],
    run_dir: Annotated[Path, typer.Option(help="nginx's config, pid and temp files")],
    certs: Annotated[
        Path | None, typer.Option(help="server.pem, server.key, ca.crt (TLS on both sides)")
    ] = None,
    no_tls: Annotated[bool, typer.Option("--no-tls", help="plain HTTP (a development fleet)")] = False,
) -> None:
    """Serve the fleet's published port: nginx passing the Fleet API only (deploy/proxy.py)."""
    import sys

    from dropfleet.deploy.proxy import ProxySpec, nginx_binary, run_until_stopped, write_config

    if (certs is None) != no_tls:
        exit_with(2, "give --certs DIR, or --no-tls for a development fleet")
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit():
        exit_with(2, f"--listen takes HOST:PORT, got {listen!r}")
    try:
        nginx = nginx_binary()
    except DropfleetError as exc:
        exit_with(2, str(exc))
    spec = ProxySpec(host, int(port), upstream_port, str(certs.resolve()) if certs else None, str(run_dir))
    conf = write_config(spec, run_dir / "nginx.conf")
    # nginx runs as a child, not exec'd: this process keeps the command line its supervisor
    # recorded (the process fleet stops what it started by PID and command line).
    sys.exit(run_until_stopped([nginx, "-c", str(conf.resolve()), "-p", str(run_dir.resolve())]))
