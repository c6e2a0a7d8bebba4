"""The fleet's topology: every process and its command line, for any place it runs.

The process fleet (deploy/fleet.py), docker-compose.yml (deploy/compose.py) and
the edge units run what `topology` says, each with its own `Layout` (where the
SuperLink is, what servers bind to, where data and certificates live), so they
cannot drift apart.
"""

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from dropfleet.common.errors import ConfigError

BIN = Path(sys.executable).parent
# The same ports as docker-compose.yml (SuperNode runtime ports differ per node here).
SUPERLINK_PORT = 8000
API_PORT = 8080
NODE_PORT_BASE = 9100
CONNECTION = "fleet"


@dataclass(frozen=True)
class FleetSpec:
    nodes: int = 4
    profiles: tuple[str, ...] = ("mcu-512k", "pi-zero-512m", "pi4-4g", "jetson-8g")
    tls: bool = True
    node_auth: bool = False  # only registered SuperNodes may connect (needs TLS)
    streaming: bool = False  # devices stream even when the dense step fits (node config streaming=true)
    host: str = "127.0.0.1"
    superlink_port: int = SUPERLINK_PORT
    api_port: int = API_PORT
    node_port_base: int = NODE_PORT_BASE
    state_dir: Path = field(default_factory=lambda: Path(".fleet"))

    def validate(self) -> None:
        if self.node_auth and not self.tls:
            raise ConfigError("SuperNode authentication needs TLS")
        if self.nodes < 1:
            raise ConfigError(f"a fleet needs at least one node, got {self.nodes}")
        if not self.profiles:
            raise ConfigError("at least one device profile is needed")
        from dropfleet.client.profiles import get_profile

        for p in self.profiles:
            get_profile(p)


@dataclass(frozen=True)
class Layout:
    """Where a fleet's processes find each other and their files (local or in containers)."""

    superlink_host: str  # how clients reach the SuperLink
    bind_host: str  # what servers bind to
    node_host: str  # where a SuperNode's local runtime API listens (its SuperExec connects there)
    bin_dir: str  # "" in containers: commands are on PATH
    data_dir: str
    certs_dir: str | None  # None: TLS off
    node_port: Callable[[int], int]  # runtime API port of SuperNode i


def _exe(layout: Layout, name: str) -> str:
    return f"{layout.bin_dir}/{name}" if layout.bin_dir else name


def topology(spec: FleetSpec, layout: Layout) -> dict[str, list[str]]:
    """Every process of the fleet and its command line, by name: the process fleet and
    docker-compose.yml are both generated from this, so they cannot drift apart."""
    link = f"{layout.superlink_host}:{spec.superlink_port}"
    certs = layout.certs_dir
    to_link = ["--root-certificates", f"{certs}/ca.crt"] if certs else ["--insecure"]
    superlink = [
        _exe(layout, "flower-superlink"),
        "--host",
        layout.bind_host,
        "--port",
        str(spec.superlink_port),
        "--isolation",
        "process",
        "--database",
        f"{layout.data_dir}/superlink.db",
        "--disable-runtime-dependency-installation",
    ]
    superlink += (
        [
            f"--ssl-ca-certfile={certs}/ca.crt",
            f"--ssl-certfile={certs}/server.pem",
            f"--ssl-keyfile={certs}/server.key",
        ]
        if certs
        else ["--insecure"]
    )
    if spec.node_auth:
        superlink.append("--enable-supernode-auth")
    procs = {
        "superlink": superlink,
        "superexec-serverapp": [_exe(layout, "flower-superexec"), "--runtime-api-address", link, *to_link],
    }
    for i in range(spec.nodes):
        port = layout.node_port(i)
        profile = spec.profiles[i % len(spec.profiles)]
        node_config = f'partition-id={i} num-partitions={spec.nodes} profile="{profile}"'
        if spec.streaming:
            node_config += " streaming=true"
        procs[f"supernode-{i}"] = [
            _exe(layout, "flower-supernode"),
            "--superlink",
            link,
            "--isolation",
            "process",
            "--host",
            layout.node_host,
            "--port",
            str(port),
            "--node-config",
            node_config,
            *to_link,
        ]
        if spec.node_auth:
            key = f"{layout.data_dir}/keys/node-{i}"
            procs[f"supernode-{i}"] += [
                "--auth-supernode-private-key",
                key,
                "--auth-supernode-public-key",
                f"{key}.pub",
            ]
        # The SuperNode's runtime API is local to the node (loopback), hence no TLS here.
        procs[f"superexec-clientapp-{i}"] = [
            _exe(layout, "flower-superexec"),
            "--insecure",
            "--runtime-api-address",
            f"{layout.node_host}:{port}",
        ]
    procs["api"] = [
        _exe(layout, "dropfleet"),
        "api",
        "--host",
        layout.bind_host,
        "--port",
        str(spec.api_port),
    ]
    return procs


def local_layout(spec: FleetSpec, state: Path) -> Layout:
    return Layout(
        superlink_host=spec.host,
        bind_host=spec.host,
        node_host=spec.host,
        bin_dir=str(BIN),
        data_dir=str(state),
        certs_dir=str(state / "certs") if spec.tls else None,
        node_port=lambda i: spec.node_port_base + i,
    )
