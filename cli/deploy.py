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
    trust: Annotated[Path, typer.Option(help="public files for every board: ca.crt, app-signer.pub")],
    signing: Annotated[Path, typer.Option(help="the operator's app signing key (the API's)")],
    keys: Annotated[Path, typer.Option(help="the server's SuperExec secret")],
    node_keys: Annotated[Path, typer.Option(help="each SuperNode's key pair and SuperExec secret")],
    nodes: Annotated[int, typer.Option(help="SuperNodes to make keys for")] = 4,
    out: Annotated[Path | None, typer.Option(help="the server's TLS material")] = None,
    no_tls: Annotated[bool, typer.Option("--no-tls", help="no certificates (a development fleet)")] = False,
    flwr_home: Annotated[
        Path | None, typer.Option(help="also write the operator's Flower connection")
    ] = None,
    control_api: Annotated[
        str, typer.Option(help="the SuperLink's loopback address, for that connection")
    ] = "127.0.0.1:8001",
    name: Annotated[
        list[str] | None,
        typer.Option("--name", help="also name this host in the server certificate (where boards reach it)"),
    ] = None,
    drop_to: Annotated[
        str | None, typer.Option(help="started as root: give the directories to this user, then run as it")
    ] = None,
    per_node: Annotated[
        bool, typer.Option("--per-node", help="board i's keys in NODE_KEYS/i, its secret in .../i-secret")
    ] = False,
) -> None:
    """Create a fleet's keys and certificates, each in its own directory (compose's `certs` one-shot)."""
    from dropfleet.deploy.material import Material, create, run_as
    from dropfleet.deploy.topology import CONNECTION
    from dropfleet.fleet.flower_env import write_connection

    if (out is None) != no_tls:
        exit_with(2, "give --out DIR for the TLS material, or --no-tls for a development fleet")
    material = Material(out, trust, signing, keys, node_keys, per_node)
    if drop_to is not None:
        boards = [d for i in range(nodes) for d in (material.node_dir(i), material.node_secret_dir(i))]
        try:
            run_as(drop_to, [d for d in (out, trust, signing, keys, node_keys, flwr_home, *boards) if d])
        except (KeyError, PermissionError) as exc:
            exit_with(2, f"--drop-to {drop_to}: {exc}")
    create(material, nodes, names=tuple(n for n in name or () if n))
    if flwr_home is not None:
        ca = trust / "ca.crt" if out else None
        write_connection(flwr_home, CONNECTION, control_api, ca, insecure=True)
    console.print(f"fleet material for {nodes} node(s); boards get {trust}")
