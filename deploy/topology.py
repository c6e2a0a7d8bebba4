"""The fleet's topology: every process and its command line, for any place it runs.

The process fleet (deploy/fleet.py), docker-compose.yml (deploy/compose.py) and
the edge units run what `topology` says, each with its own `Layout` (where the
SuperLink is, what servers bind to, where data and certificates live), so they
cannot drift apart.

Safe to publish (docs/security.md): the SuperLink listens on loopback only and
the published port is the proxy (deploy/proxy.py), which passes the Fleet API
and nothing else; every SuperExec is `dropfleet-superexec`, which runs only
apps the operator signed (fleet/launcher.py); SuperNodes authenticate with a
registered key. Turning any of that off needs `dev=True`, said explicitly.
"""

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from dropfleet.common.errors import ConfigError
from dropfleet.deploy.material import APP_SIGNER
from dropfleet.server.api.settings import is_loopback

BIN = Path(sys.executable).parent
# The same ports as docker-compose.yml (SuperNode runtime ports differ per node here).
SUPERLINK_PORT = 8000
API_PORT = 8080
NODE_PORT_BASE = 9100
CONNECTION = "fleet"
SIGNATURE_LEDGER = "signatures.db"


def board_data_dir(data_dir: str, node: int) -> str:
    """Where board `node` of a lean fleet keeps its own data (its partition, cut at fleet up)."""
    return f"{data_dir}/boards/node-{node}"


@dataclass(frozen=True)
class FleetSpec:
    nodes: int = 4
    profiles: tuple[str, ...] = ("mcu-512k", "pi-zero-512m", "pi4-4g", "jetson-8g")
    tls: bool = True
    node_auth: bool = True  # only registered SuperNodes may connect (needs TLS)
    streaming: bool = False  # devices stream even when the dense step fits (node config streaming=true)
    # How the boards train (node config runtime): "torch", on their partitions of Fashion-MNIST, or
    # "lean" (NumPy alone), each on its partition cut at `fleet up` into its own data-dir
    # (board_data_dir), as a real board holds its own data. Process fleets only.
    runtime: str = "torch"
    host: str = "127.0.0.1"
    superlink_port: int = SUPERLINK_PORT  # the published port (the proxy)
    # The SuperLink itself (all of its APIs), on loopback only; 0: superlink_port + 1.
    control_port: int = 0
    api_port: int = API_PORT
    node_port_base: int = NODE_PORT_BASE
    state_dir: Path = field(default_factory=lambda: Path(".fleet"))
    # Development only: TLS or node authentication may be off, and any app runs, signed or not.
    dev: bool = False

    @property
    def api_loopback_port(self) -> int:
        """Where the API listens when the proxy publishes it (beyond loopback): the API port + 1."""
        return self.api_port + 1

    @property
    def link_port(self) -> int:
        """Where the SuperLink listens (loopback): the operator's Control API and the Runtime API."""
        return self.control_port or self.superlink_port + 1

    def validate(self) -> None:
        if self.node_auth and not self.tls:
            raise ConfigError("SuperNode authentication needs TLS")
        if not self.dev and not (self.tls and self.node_auth):
            raise ConfigError(
                "a fleet without TLS or without SuperNode authentication is a development fleet: "
                "ask for it explicitly (--dev)"
            )
        if self.api_loopback_port in (self.superlink_port, self.link_port):
            raise ConfigError("the API's loopback port (the API port + 1) must differ from the SuperLink's")
        if self.link_port == self.superlink_port:
            raise ConfigError("the SuperLink's loopback port must differ from the published port")
        if self.nodes < 1:
            raise ConfigError(f"a fleet needs at least one node, got {self.nodes}")
        if not self.profiles:
            raise ConfigError("at least one device profile is needed")
        if self.runtime not in ("torch", "lean"):
            raise ConfigError(f"runtime is torch or lean, got {self.runtime!r}")
        from dropfleet.fleet.profiles import get_profile

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
    keys_dir: str  # the operator's secrets: node keys, SuperExec secrets (never on a board)
    trust_dir: str  # public material every board receives: ca.crt, app-signer.pub
    # Where a node's SuperExec secret is, when not with its node key (compose: the ClientApps'
    # container gets the secret alone, never the node key).
    node_secrets_dir: str = ""


def _exe(layout: Layout, name: str) -> str:
    return f"{layout.bin_dir}/{name}" if layout.bin_dir else name


def topology(spec: FleetSpec, layout: Layout) -> dict[str, list[str]]:
    """Every process of the fleet and its command line, by name: the process fleet and
    docker-compose.yml are both generated from this, so they cannot drift apart."""
    published = f"{layout.superlink_host}:{spec.superlink_port}"
    loopback = f"127.0.0.1:{spec.link_port}"
    certs = layout.certs_dir
    # Clients verify the SuperLink with the CA certificate from the public trust directory.
    to_link = ["--root-certificates", f"{layout.trust_dir}/ca.crt"] if certs else ["--insecure"]
    # Apps run only when the operator signed them (fleet/launcher.py), unless this is a dev fleet.
    gate = (
        ["--allow-unsigned-apps"] if spec.dev else ["--trusted-app-keys", f"{layout.trust_dir}/{APP_SIGNER}"]
    )
    # The server also keeps the signatures it has run: each signs one run (no replays).
    ledger = [] if spec.dev else ["--signature-ledger", f"{layout.data_dir}/store/{SIGNATURE_LEDGER}"]
    superlink = [
        _exe(layout, "flower-superlink"),
        "--host",
        "127.0.0.1",
        "--port",
        str(spec.link_port),
        "--isolation",
        "process",
        "--database",
        f"{layout.data_dir}/superlink.db",
        "--disable-runtime-dependency-installation",
        "--superexec-auth-secret-file",
        f"{layout.keys_dir}/superexec-server",
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
    proxy = [
        _exe(layout, "dropfleet-proxy"),
        "--listen",
        f"{layout.bind_host}:{spec.superlink_port}",
        "--upstream-port",
        str(spec.link_port),
        "--run-dir",
        f"{layout.data_dir}/proxy",
    ]
    proxy += ["--certs", certs] if certs else ["--no-tls"]
    # The API binds loopback only; published beyond it, it is behind the proxy (TLS, tokens for reads).
    if api_published(layout):
        proxy += ["--api-port", str(spec.api_port), "--api-upstream-port", str(spec.api_loopback_port)]
        api_bind = ["--host", "127.0.0.1", "--port", str(spec.api_loopback_port)]
    else:
        api_bind = ["--host", layout.bind_host, "--port", str(spec.api_port)]
    procs = {
        "superlink": superlink,
        "proxy": proxy,
        "superexec-serverapp": [
            _exe(layout, "dropfleet-superexec"),
            "--runtime-api-address",
            loopback,
            *to_link,
            "--superexec-auth-secret-file",
            f"{layout.keys_dir}/superexec-server",
            *gate,
            *ledger,
        ],
    }
    for i in range(spec.nodes):
        port = layout.node_port(i)
        profile = spec.profiles[i % len(spec.profiles)]
        node_config = f'partition-id={i} num-partitions={spec.nodes} profile="{profile}"'
        if spec.streaming:
            node_config += " streaming=true"
        if spec.runtime == "lean":
            node_config += f' runtime="lean" data-dir="{board_data_dir(layout.data_dir, i)}"'
        secret_dir = layout.node_secrets_dir or layout.keys_dir
        secret = ["--superexec-auth-secret-file", f"{secret_dir}/superexec-node-{i}"]
        procs[f"supernode-{i}"] = [
            _exe(layout, "flower-supernode"),
            "--superlink",
            published,
            "--isolation",
            "process",
            "--host",
            layout.node_host,
            "--port",
            str(port),
            "--node-config",
            node_config,
            *to_link,
            *secret,
        ]
        if spec.node_auth:
            key = f"{layout.keys_dir}/node-{i}"
            procs[f"supernode-{i}"] += [
                "--auth-supernode-private-key",
                key,
                "--auth-supernode-public-key",
                f"{key}.pub",
            ]
        # The SuperNode's runtime API is local to the node (loopback), hence no TLS here;
        # the shared secret keeps other local processes from taking its tasks.
        procs[f"superexec-clientapp-{i}"] = [
            _exe(layout, "dropfleet-superexec"),
            "--insecure",
            "--runtime-api-address",
            f"{layout.node_host}:{port}",
            *secret,
            *gate,
        ]
    procs["api"] = [_exe(layout, "dropfleet"), "api", *api_bind]
    return procs


def api_published(layout: Layout) -> bool:
    """Whether callers beyond this machine reach the fleet (and so the API, through the proxy)."""
    return not is_loopback(layout.bind_host)


def local_layout(spec: FleetSpec, state: Path) -> Layout:
    return Layout(
        superlink_host=spec.host,
        bind_host=spec.host,
        node_host=spec.host,
        bin_dir=str(BIN),
        data_dir=str(state),
        certs_dir=str(state / "certs") if spec.tls else None,
        node_port=lambda i: spec.node_port_base + i,
        keys_dir=str(state / "keys"),
        trust_dir=str(state / "trust"),
    )
