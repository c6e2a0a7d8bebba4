"""Generate docker-compose.yml from the same topology as the process fleet.

    dropfleet compose --nodes 8 > docker-compose.yml   # scaling the fleet is one number
    dropfleet compose --network host                   # no compose network: every service on 127.0.0.1

Each SuperNode gets its device profile through --node-config, and the
container that runs its ClientApps (its SuperExec, sharing the SuperNode's
network namespace so the runtime API stays on loopback, as in the process
fleet) gets a memory limit and CPU share from that profile.

Safe by default: published ports bind 127.0.0.1 unless DROPFLEET_PUBLISH_HOST
says otherwise, and the API's admin token is a random one created on first
start in the `flwr-home` volume unless DROPFLEET_ADMIN_TOKEN is given.
"""

import json
from typing import Any

import yaml

from dropfleet.client.profiles import get_profile
from dropfleet.common.errors import ConfigError
from dropfleet.deploy.topology import API_PORT, SUPERLINK_PORT, FleetSpec, Layout, topology
from dropfleet.fleet.flower_env import OFFLINE_ENV

SERVER_IMAGE = "dropfleet-server:0.1.0"
CLIENT_IMAGE = "dropfleet-client:0.1.0"
NODE_RUNTIME_PORT = 9094  # each SuperNode container has its own loopback
# A ClientApp process (CPython, torch, Flower, its data partition) peaks at about
# 630 MiB (measured for mcu-512k and pi-zero-512m); a profile's RAM below this floor
# is raised to it (the model-state budget, not the container, is what DropBack obeys).
MIN_CONTAINER_BYTES = 768 * 1024 * 1024
STORE_URL = "sqlite:////data/store/dropfleet.db"
ADMIN_TOKEN_FILE = "/flwr/admin-token"
NETWORKS = ("bridge", "host")
PUBLISH_HOST = "${DROPFLEET_PUBLISH_HOST:-127.0.0.1}"


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
        )
    return Layout(
        superlink_host="superlink",
        bind_host="0.0.0.0",
        node_host="127.0.0.1",
        bin_dir="",
        data_dir="/data",
        certs_dir="/certs" if spec.tls else None,
        node_port=lambda i: NODE_RUNTIME_PORT,
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


def generate(spec: FleetSpec, network: str = "bridge") -> dict[str, Any]:
    """The compose services; `network="host"` puts every one on the host's network (no compose network)."""
    if network not in NETWORKS:
        raise ConfigError(f"network must be one of {NETWORKS}, got {network!r}")
    host = network == "host"
    layout = container_layout(spec, network)
    procs = topology(spec, layout)
    link = f"{layout.superlink_host}:{spec.superlink_port}"
    scheme = "https" if spec.tls else "http"
    ca = "/certs/ca.crt" if spec.tls else None
    store_env = {
        "DROPFLEET_DATABASE_URL": "${DROPFLEET_DATABASE_URL:-" + STORE_URL + "}",
        **OFFLINE_ENV,
    }
    certs_ro = ["certs:/certs:ro"] if spec.tls else []
    services: dict[str, Any] = {
        "certs": {
            "image": SERVER_IMAGE,
            "build": {"context": ".", "dockerfile": "deploy/Dockerfile.server"},
            "command": [
                "dropfleet",
                "certs",
                "--out",
                "/certs",
                "--flwr-home",
                "/flwr",
                "--superlink",
                link,
            ]
            + ([] if spec.tls else ["--no-tls"]),
            "volumes": ["certs:/certs", "flwr-home:/flwr"],
            "restart": "no",
        },
        "superlink": {
            "image": SERVER_IMAGE,
            "command": procs["superlink"],
            "ports": [f"{PUBLISH_HOST}:{spec.superlink_port}:{spec.superlink_port}"],
            "volumes": ["superlink:/data", *certs_ro],
            "environment": store_env,
            "depends_on": {"certs": {"condition": "service_completed_successfully"}},
            "healthcheck": _health(
                _py_check(f"{scheme}://{_local(layout)}:{spec.superlink_port}/health", ca)
            ),
            "restart": "unless-stopped",
        },
        "superexec-serverapp": {
            "image": SERVER_IMAGE,
            "command": procs["superexec-serverapp"],
            "volumes": ["store:/data/store", *certs_ro],
            "environment": store_env,
            "depends_on": {"superlink": {"condition": "service_healthy"}},
            "restart": "unless-stopped",
            "healthcheck": _health(_running("flower-superexec")),
        },
        "api": {
            "image": SERVER_IMAGE,
            "command": procs["api"],
            "ports": [f"{PUBLISH_HOST}:{spec.api_port}:{spec.api_port}"],
            # Read-write: `POST /runs` writes Flower's credentials there, and the admin token lives there.
            "volumes": ["store:/data/store", "flwr-home:/flwr", *certs_ro],
            "environment": {
                **store_env,
                "DROPFLEET_ENVIRONMENT": "${DROPFLEET_ENVIRONMENT:-development}",
                "DROPFLEET_ADMIN_TOKEN": "${DROPFLEET_ADMIN_TOKEN:-}",
                "DROPFLEET_ADMIN_TOKEN_FILE": ADMIN_TOKEN_FILE,
                "DROPFLEET_FLWR_HOME": "/flwr",
                "DROPFLEET_FLOWER_CONNECTION": "fleet",
                "DROPFLEET_APP_DIR": "/app",
            },
            "depends_on": {"superlink": {"condition": "service_healthy"}},
            "healthcheck": _health(_py_check(f"http://{_local(layout)}:{spec.api_port}/v1/ready", None)),
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
    for i in range(spec.nodes):
        profile = get_profile(spec.profiles[i % len(spec.profiles)])
        services[f"supernode-{i}"] = {
            "image": CLIENT_IMAGE,
            "build": {"context": ".", "dockerfile": "deploy/Dockerfile.client"},
            "command": procs[f"supernode-{i}"],
            "volumes": certs_ro,
            "depends_on": {"superlink": {"condition": "service_healthy"}},
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
            "mem_limit": max(profile.memory_bytes, MIN_CONTAINER_BYTES),
            "cpus": profile.cpus,
            "depends_on": {f"supernode-{i}": {"condition": "service_started"}},
            "restart": "unless-stopped",
            "healthcheck": _health(_running("flower-superexec")),
            "labels": {"dropfleet.profile": profile.name},
        }
    if host:
        for svc in services.values():
            svc.pop("ports", None)  # nothing to publish: services bind the host's loopback directly
            svc["network_mode"] = "host"
    volumes = {name: {} for name in ("certs", "flwr-home", "superlink", "store", "postgres")}
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
# Ports are published on 127.0.0.1 (DROPFLEET_PUBLISH_HOST=0.0.0.0 for remote SuperNodes); the
# API's admin token: `docker compose exec api cat {token}` (or set DROPFLEET_ADMIN_TOKEN).
"""


def render(spec: FleetSpec, network: str = "bridge") -> str:
    body = yaml.safe_dump(generate(spec, network), sort_keys=False, width=120, default_flow_style=False)
    flags = " --network host" if network == "host" else ""
    return HEADER.format(nodes=spec.nodes, flags=flags, token=ADMIN_TOKEN_FILE) + body


DEFAULT_SPEC = FleetSpec(nodes=4, superlink_port=SUPERLINK_PORT, api_port=API_PORT)
