"""Generate docker-compose.yml from the same topology as the process fleet.

    dropfleet compose --nodes 8 > docker-compose.yml   # scaling the fleet is one number
    dropfleet compose --network host                   # no compose network: every service on 127.0.0.1

Each SuperNode gets its device profile through --node-config, and the
container that runs its ClientApps (its SuperExec, sharing the SuperNode's
network namespace so the runtime API stays on loopback, as in the process
fleet) gets a memory limit and CPU share from that profile.

Safe to publish (docs/security.md): the only service with its own network
namespace on the server side is the proxy (nginx: the Fleet API only); the
SuperLink, the ServerApp's SuperExec and the API share the proxy's namespace,
so the SuperLink listens on that namespace's loopback and nothing else can
reach its Control and Runtime APIs. Boards must be registered (the one-shot
`register` service registers the simulated ones) and run only signed apps.
Keys live in volumes mounted only where needed (deploy/material.py): the
server's TLS key in the SuperLink and the proxy, the app signing key in the
API; each board gets the public `trust` volume and two volumes of its own, its
node key (the SuperNode's alone) and its SuperExec secret. Published ports
bind 127.0.0.1 unless DROPFLEET_PUBLISH_HOST says otherwise. The API binds the
namespace's loopback and the proxy publishes it over TLS; because the whole
compose network reaches it, reads need a token (a random one in the
`flwr-home` volume, like the admin token, unless DROPFLEET_READ_TOKEN /
DROPFLEET_ADMIN_TOKEN are given), and the API runs in production mode unless
DROPFLEET_ENVIRONMENT says otherwise.
"""

import json
from typing import Any

import yaml

from dropfleet.common.errors import ConfigError
from dropfleet.deploy.material import SIGNING_KEY
from dropfleet.deploy.topology import API_PORT, SUPERLINK_PORT, FleetSpec, Layout, api_published, topology
from dropfleet.fleet.flower_env import OFFLINE_ENV
from dropfleet.fleet.profiles import get_profile

SERVER_IMAGE = "dropfleet-server:0.1.0"
CLIENT_IMAGE = "dropfleet-client:0.1.0"
NODE_RUNTIME_PORT = 9094  # each SuperNode container has its own loopback
# A ClientApp process (CPython, torch, Flower, its data partition) peaks at about
# 630 MiB (measured for mcu-512k and pi-zero-512m); a profile's RAM below this floor
# is raised to it (the model-state budget, not the container, is what DropBack obeys).
MIN_CONTAINER_BYTES = 768 * 1024 * 1024
STORE_URL = "sqlite:////data/store/dropfleet.db"
ADMIN_TOKEN_FILE = "/flwr/admin-token"
# Where each volume of deploy/material.py is mounted (node keys at /keys in a board's containers).
MOUNTS = {
    "certs": "/certs",
    "trust": "/trust",
    "signing": "/signing",
    "keys": "/keys",
    "flwr-home": "/flwr",
}
READ_TOKEN_FILE = "/flwr/read-token"
NETWORKS = ("bridge", "host")
PUBLISH_HOST = "${DROPFLEET_PUBLISH_HOST:-127.0.0.1}"
PUBLISH_NAME = "${DROPFLEET_PUBLISH_NAME:-localhost}"


def container_layout(spec: FleetSpec, network: str = "bridge") -> Layout:
    if network == "host":  # one shared loopback: each node's runtime API needs its own port
        return Layout(
            superlink_host=spec.host,
            bind_host=spec.host,
            node_host=spec.host,
            bin_dir="",
            data_dir="/data",
            certs_dir="/certs" if spec.tls else None,
            node_port=lambda i: spec.node_port_base + i,
            keys_dir="/keys",
            trust_dir="/trust",
            node_secrets_dir="/secrets",
        )
    return Layout(
        superlink_host="superlink",  # the proxy's network alias: what the certificate names
        bind_host="0.0.0.0",
        node_host="127.0.0.1",
        bin_dir="",
        data_dir="/data",
        certs_dir="/certs" if spec.tls else None,
        node_port=lambda i: NODE_RUNTIME_PORT,
        keys_dir="/keys",
        trust_dir="/trust",
        node_secrets_dir="/secrets",
    )


def _py_check(url: str, ca: str | None) -> list[str]:
    verify = f"'{ca}'" if ca else "False"
    code = (
        f"import httpx,sys; sys.exit(0 if httpx.get('{url}', verify={verify}, timeout=3).is_success else 1)"
    )
    return ["CMD", "python", "-c", code]


def _running(program: str) -> list[str]:
    """Liveness for services without an HTTP endpoint: their program is running."""
    code = (
        "import os,sys; sys.exit(0 if any(b'" + program + "' in open(f'/proc/{p}/cmdline','rb').read() "
        "for p in os.listdir('/proc') if p.isdigit()) else 1)"
    )
    return ["CMD", "python", "-c", code]


def _health(test: list[str]) -> dict[str, Any]:
    return {"test": test, "interval": "5s", "timeout": "5s", "retries": 20, "start_period": "10s"}


def _mounts(*volumes: str, rw: bool = False) -> list[str]:
    return [f"{v}:{MOUNTS.get(v, '/' + v)}" + ("" if rw else ":ro") for v in volumes]


def generate(spec: FleetSpec, network: str = "bridge") -> dict[str, Any]:
    """The compose services; `network="host"` puts every one on the host's network (no compose network)."""
    if network not in NETWORKS:
        raise ConfigError(f"network must be one of {NETWORKS}, got {network!r}")
    if spec.runtime != "torch":  # a lean board's own data would need a volume per board, cut by a job
        raise ConfigError("a compose fleet's boards train on the torch runtime (their partitions)")
    host = network == "host"
    layout = container_layout(spec, network)
    procs = topology(spec, layout)
    scheme = "https" if spec.tls else "http"
    ca = "/trust/ca.crt" if spec.tls else None
    store_env = {
        "DROPFLEET_DATABASE_URL": "${DROPFLEET_DATABASE_URL:-" + STORE_URL + "}",
        **OFFLINE_ENV,
    }
    certs = ["certs"] if spec.tls else []
    # The server side shares the proxy's network namespace: its loopback is the SuperLink's.
    behind_proxy = {"network_mode": "service:proxy"}
    init = [
        "dropfleet", "certs", "--nodes", str(spec.nodes), "--flwr-home", "/flwr",
        "--control-api", f"127.0.0.1:{spec.link_port}",
        *(["--out", "/certs"] if spec.tls else ["--no-tls"]),
        *(f"--{name}={MOUNTS[name]}" for name in ("trust", "signing", "keys")),
        "--node-keys=/node-keys", "--per-node",
        # The name boards and API clients use for the published fleet, in the server certificate.
        f"--name={PUBLISH_NAME}",
        # Docker makes the boards' mount points root's: the one-shot starts as root, hands them
        # to the image's user and runs as it from then on.
        "--drop-to", "dropfleet",
    ]  # fmt: skip
    # Two volumes a board, its node key and its SuperExec secret: a board's containers see no other
    # board's, and its ClientApps' container gets the secret alone.
    node_keys = [f"node-keys-{i}" for i in range(spec.nodes)]
    node_secrets = [f"node-secret-{i}" for i in range(spec.nodes)]
    published = api_published(layout)
    api_check = f"127.0.0.1:{spec.api_loopback_port}" if published else f"{_local(layout)}:{spec.api_port}"
    services: dict[str, Any] = {
        "certs": {
            "image": SERVER_IMAGE,
            "build": {"context": ".", "dockerfile": "deploy/Dockerfile.server"},
            "command": init,
            "user": "root",
            "volumes": [
                *_mounts(*certs, "trust", "signing", "keys", "flwr-home", rw=True),
                *(f"{v}:/node-keys/{i}" for i, v in enumerate(node_keys)),
                *(f"{v}:/node-keys/{i}-secret" for i, v in enumerate(node_secrets)),
            ],
            "restart": "no",
        },
        "proxy": {
            "image": SERVER_IMAGE,
            "command": procs["proxy"],
            # Published here: the namespace's owner (nginx: the Fleet API; the REST API over TLS).
            "ports": [
                f"{PUBLISH_HOST}:{spec.superlink_port}:{spec.superlink_port}",
                f"{PUBLISH_HOST}:{spec.api_port}:{spec.api_port}",
            ],
            "networks": {"default": {"aliases": ["superlink"]}},
            "volumes": ["proxy:/data/proxy", *_mounts(*certs)],
            "depends_on": {"certs": {"condition": "service_completed_successfully"}},
            "healthcheck": _health(
                _py_check(f"{scheme}://{_local(layout)}:{spec.superlink_port}/health", ca and "/certs/ca.crt")
            ),
            "restart": "unless-stopped",
        },
        "superlink": {
            "image": SERVER_IMAGE,
            **behind_proxy,
            "command": procs["superlink"],
            "volumes": ["superlink:/data", *_mounts(*certs, "keys")],
            "environment": store_env,
            "depends_on": {"proxy": {"condition": "service_started"}},
            "healthcheck": _health(
                _py_check(f"{scheme}://127.0.0.1:{spec.link_port}/health", ca and "/certs/ca.crt")
            ),
            "restart": "unless-stopped",
        },
        "superexec-serverapp": {
            "image": SERVER_IMAGE,
            **behind_proxy,
            "command": procs["superexec-serverapp"],
            "volumes": ["store:/data/store", *_mounts("trust", "keys")],
            "environment": store_env,
            "depends_on": {"superlink": {"condition": "service_healthy"}},
            "restart": "unless-stopped",
            "healthcheck": _health(_running("dropfleet-superexec")),
        },
        "api": {
            "image": SERVER_IMAGE,
            **behind_proxy,
            "command": procs["api"],
            # Read-write: `POST /runs` writes Flower's credentials there, and the admin token lives there.
            "volumes": ["store:/data/store", "flwr-home:/flwr", *_mounts("trust", "signing")],
            "environment": {
                **store_env,
                "DROPFLEET_ENVIRONMENT": "${DROPFLEET_ENVIRONMENT:-production}",
                # Behind the proxy the API is reachable from the whole compose network (the boards
                # included), so reads need a token too; on the host's loopback alone they may be open.
                "DROPFLEET_PUBLISHED_HOST": layout.bind_host if published else PUBLISH_HOST,
                "DROPFLEET_READ_ACCESS": f"${{DROPFLEET_READ_ACCESS:-{'token' if published else 'open'}}}",
                "DROPFLEET_READ_TOKEN": "${DROPFLEET_READ_TOKEN:-}",
                "DROPFLEET_READ_TOKEN_FILE": READ_TOKEN_FILE,
                "DROPFLEET_ADMIN_TOKEN": "${DROPFLEET_ADMIN_TOKEN:-}",
                "DROPFLEET_ADMIN_TOKEN_FILE": ADMIN_TOKEN_FILE,
                "DROPFLEET_FLWR_HOME": "/flwr",
                "DROPFLEET_FLOWER_CONNECTION": "fleet",
                "DROPFLEET_APP_DIR": "/app",
                "DROPFLEET_APP_SIGNING_KEY": f"{MOUNTS['signing']}/{SIGNING_KEY}",
            },
            "depends_on": {"superlink": {"condition": "service_healthy"}},
            "healthcheck": _health(_py_check(f"http://{api_check}/v1/ready", None)),
            "restart": "unless-stopped",
        },
        "postgres": {
            "image": "postgres:15",
            "profiles": ["postgres"],
            "environment": {
                "POSTGRES_USER": "dropfleet",
                "POSTGRES_PASSWORD": "${POSTGRES_PASSWORD:-dropfleet}",
                "POSTGRES_DB": "dropfleet",
            },
            "volumes": ["postgres:/var/lib/postgresql/data"],
            "healthcheck": _health(["CMD", "pg_isready", "-U", "dropfleet"]),
        },
    }
    node_ready = {"proxy": {"condition": "service_healthy"}}
    if spec.node_auth:  # the simulated boards' keys, registered on the loopback Control API
        keys = [f"/node-keys/{i}/node-{i}.pub" for i in range(spec.nodes)]
        services["register"] = {
            "image": SERVER_IMAGE,
            **behind_proxy,
            "command": ["dropfleet", "fleet", "register-node", "--flwr-home", "/flwr", *keys],
            # Flower's CLI writes into its home (credentials, logs), hence read-write.
            "volumes": [
                "flwr-home:/flwr",
                *(f"{v}:/node-keys/{i}:ro" for i, v in enumerate(node_keys)),
                *_mounts("trust"),
            ],
            "depends_on": {"superlink": {"condition": "service_healthy"}},
            "restart": "no",
        }
        node_ready["register"] = {"condition": "service_completed_successfully"}
    for i in range(spec.nodes):
        profile = get_profile(spec.profiles[i % len(spec.profiles)])
        services[f"supernode-{i}"] = {
            "image": CLIENT_IMAGE,
            "build": {"context": ".", "dockerfile": "deploy/Dockerfile.client"},
            "command": procs[f"supernode-{i}"],
            "volumes": [*_mounts("trust"), f"{node_keys[i]}:/keys:ro", f"{node_secrets[i]}:/secrets:ro"],
            "depends_on": node_ready,
            "restart": "unless-stopped",
            "healthcheck": _health(
                _py_check(f"http://{layout.node_host}:{layout.node_port(i)}/health", None)
            ),
            "labels": {"dropfleet.profile": profile.name},
        }
        services[f"superexec-clientapp-{i}"] = {
            "image": CLIENT_IMAGE,
            "command": procs[f"superexec-clientapp-{i}"],
            "network_mode": "host" if host else f"service:supernode-{i}",
            "volumes": [*_mounts("trust"), f"{node_secrets[i]}:/secrets:ro"],
            "mem_limit": max(profile.memory_bytes, MIN_CONTAINER_BYTES),
            "cpus": profile.cpus,
            "depends_on": {f"supernode-{i}": {"condition": "service_started"}},
            "restart": "unless-stopped",
            "healthcheck": _health(_running("dropfleet-superexec")),
            "labels": {"dropfleet.profile": profile.name},
        }
    if host:
        for svc in services.values():
            svc.pop("ports", None)  # nothing to publish: services bind the host's loopback directly
            svc.pop("networks", None)
            svc["network_mode"] = "host"
    names = ("certs", "trust", "signing", "keys", *node_keys, *node_secrets, "proxy", "flwr-home")
    volumes = {name: {} for name in (*names, "superlink", "store", "postgres")}
    # A JSON round trip unshares the dicts services share, so the YAML has no anchors.
    return json.loads(json.dumps({"services": services, "volumes": volumes}))


def _local(layout: Layout) -> str:
    """Where a service's own health check reaches it."""
    return "localhost" if layout.bind_host == "0.0.0.0" else layout.bind_host


HEADER = """\
# Generated by `dropfleet compose --nodes {nodes}{flags}` from the process fleet's topology
# (deploy/topology.py). Do not edit by hand: regenerate, e.g. with more SuperNodes:
#     dropfleet compose --nodes 12 > docker-compose.yml
# `docker compose up` builds the images from deploy/ and starts the fleet;
# `docker compose --profile postgres up` adds PostgreSQL (set DROPFLEET_DATABASE_URL).
# Ports are published on 127.0.0.1 (DROPFLEET_PUBLISH_HOST=0.0.0.0 for remote SuperNodes).{api}
"""
API_BEHIND_PROXY = """
# The API: https://127.0.0.1:8080 (the fleet's CA: `docker compose exec api cat /trust/ca.crt`); its
# tokens: `docker compose exec api cat {token}` (admin), `... cat {read}` (reads)."""
API_ON_LOOPBACK = """
# The API's admin token: `docker compose exec api cat {token}` (or set DROPFLEET_ADMIN_TOKEN)."""


def render(spec: FleetSpec, network: str = "bridge") -> str:
    body = yaml.safe_dump(generate(spec, network), sort_keys=False, width=120, default_flow_style=False)
    flags = " --network host" if network == "host" else ""
    api = API_BEHIND_PROXY if api_published(container_layout(spec, network)) else API_ON_LOOPBACK
    api = api.format(token=ADMIN_TOKEN_FILE, read=READ_TOKEN_FILE)
    return HEADER.format(nodes=spec.nodes, flags=flags, api=api) + body


DEFAULT_SPEC = FleetSpec(nodes=4, superlink_port=SUPERLINK_PORT, api_port=API_PORT)
