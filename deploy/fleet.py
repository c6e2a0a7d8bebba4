"""The process fleet: the topology (deploy/topology.py) as supervised local processes on 127.0.0.1.

    dropfleet fleet up --nodes 4      # SuperLink + proxy + SuperExecs + SuperNodes + API: TLS,
                                      # node auth, signed apps only (--dev turns them off)
    dropfleet fleet status
    dropfleet fleet down              # stops exactly what `up` started (PID files)

Every process is started in its own session with its command line recorded
next to its PID, so `down` stops only processes that are still the ones it
started, also after `up` or the machine's shell crashed half-way.
"""

import json
import os
import secrets
import signal
import socket
import subprocess
import time
from dataclasses import asdict
from pathlib import Path

import httpx

from dropfleet.common.device.data import check_fashion_mnist
from dropfleet.common.errors import DropfleetError
from dropfleet.deploy.material import Material, write_secret
from dropfleet.deploy.material import create as create_material
from dropfleet.deploy.topology import (
    BIN,
    CONNECTION,
    FleetSpec,
    api_published,
    board_data_dir,
    local_layout,
    topology,
)
from dropfleet.fleet.app_signing import SIGNING_KEY_ENV
from dropfleet.fleet.flower_env import OFFLINE_ENV, write_connection


class FleetError(DropfleetError, RuntimeError):
    """The fleet could not be brought up, or its state directory is inconsistent."""


def _env(spec: FleetSpec, state: Path) -> dict[str, str]:
    env = {**os.environ, **OFFLINE_ENV}
    env["PATH"] = str(BIN) + os.pathsep + env.get("PATH", "")
    env["FLWR_HOME"] = str(state / "flwr")
    env.setdefault("DROPFLEET_DATABASE_URL", f"sqlite:///{state / 'store.db'}")
    return env


def local_material(spec: FleetSpec, state: Path) -> Material:
    """The process fleet keeps every secret in `keys/` (one operator, one machine)."""
    layout = local_layout(spec, state)
    keys = Path(layout.keys_dir)
    return Material(
        certs=Path(layout.certs_dir) if layout.certs_dir else None,
        trust=Path(layout.trust_dir),
        signing=keys,
        keys=keys,
        node_keys=keys,
    )


def register_node(flwr_home: Path, public_key: Path) -> bool:
    """Let the board holding `public_key`'s private half join (`flwr supernode register` on the
    operator's loopback Control API: the published port refuses registrations). False when the
    key was registered already."""
    env = {**os.environ, **OFFLINE_ENV, "FLWR_HOME": str(flwr_home.resolve())}
    done = subprocess.run(
        [str(BIN / "flwr"), "supernode", "register", str(public_key.resolve()), CONNECTION],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    said = done.stdout + done.stderr
    if "Public key already in use" in said:  # a restart registers again: the key is known
        return False
    if done.returncode != 0 or "registered successfully" not in done.stdout:
        raise FleetError(f"could not register {public_key}: {said.strip()[-300:]}")
    return True


def _register_nodes(spec: FleetSpec, state: Path) -> None:
    """With node auth on, register every node's public key before any SuperNode starts."""
    material = local_material(spec, state)
    for i in range(spec.nodes):
        register_node(state / "flwr", material.node_key(i).with_suffix(".pub"))


def _port_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port_range(count: int, host: str = "127.0.0.1") -> int:
    """A first port of `count` consecutive free ones on `host` (for fleets beside others: tests, benches)."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind((host, 0))
            base = s.getsockname()[1]
        if base + count <= 65536 and all(_port_free(host, p) for p in range(base, base + count)):
            return base
    raise FleetError(f"no {count} consecutive free ports on {host}")


def _wait(check: callable, what: str, timeout: float, procs: dict[str, subprocess.Popen]) -> None:  # type: ignore[valid-type]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for name, p in procs.items():
            if p.poll() is not None:
                raise FleetError(f"{name} exited with code {p.returncode} while waiting for {what}")
        try:
            if check():
                return
        except (httpx.HTTPError, OSError):
            pass
        time.sleep(0.3)
    raise FleetError(f"timed out after {timeout:.0f}s waiting for {what}")


def up(spec: FleetSpec, timeout: float = 90.0) -> dict[str, object]:
    """Start the fleet, wait until healthy, and return where everything is."""
    spec.validate()
    check_fashion_mnist()  # the ServerApp and every device here train on it
    state = spec.state_dir.resolve()
    if list((state / "pids").glob("*.json")) if (state / "pids").exists() else []:
        raise FleetError(f"{state} already has a fleet; run `dropfleet fleet down` first")
    layout = local_layout(spec, state)
    published = api_published(layout)
    ports = [spec.superlink_port, spec.link_port, spec.api_port, *([spec.api_loopback_port] * published)]
    ports += [spec.node_port_base + i for i in range(spec.nodes)]
    busy = [p for p in ports if not _port_free(spec.host, p)]
    if busy:
        raise FleetError(f"ports already in use on {spec.host}: {busy}")
    for sub in ("pids", "logs", "flwr"):
        (state / sub).mkdir(parents=True, exist_ok=True)
    material = local_material(spec, state)
    # The certificate names where boards and API clients reach the fleet, beyond the defaults.
    hosts = () if spec.host in ("0.0.0.0", "::") else (spec.host,)
    create_material(material, spec.nodes, names=hosts)
    token_file = state / "admin-token"
    if not token_file.exists():
        write_secret(token_file, secrets.token_urlsafe(32).encode())
    # The operator's connection: the SuperLink itself on loopback (the published port refuses it).
    write_connection(
        state / "flwr",
        CONNECTION,
        f"127.0.0.1:{spec.link_port}",
        material.trust / "ca.crt" if spec.tls else None,
        True,
    )
    if spec.runtime == "lean":  # each board's own data: its partition, as the torch boards cut theirs
        from dropfleet.common.device.data import save_partition

        for i in range(spec.nodes):
            save_partition(board_data_dir(str(state), i), i, spec.nodes)
    env = _env(spec, state)
    started: dict[str, subprocess.Popen] = {}
    try:
        for name, cmd in topology(spec, layout).items():
            started[name] = _spawn(spec, state, name, cmd)
            if name == "superlink":
                _wait_superlink(spec, state, started, timeout, spec.link_port)
                if spec.node_auth:
                    _register_nodes(spec, state)
            if name == "proxy":
                _wait_superlink(spec, state, started, timeout, spec.superlink_port)
        _wait_ready(spec, started, timeout)
    except BaseException:
        down(spec.state_dir)
        raise
    info = {
        "state_dir": str(state),
        "superlink": f"{spec.host}:{spec.superlink_port}",
        "control_api": f"127.0.0.1:{spec.link_port}",
        "tls": spec.tls,
        "node_auth": spec.node_auth,
        "signed_apps_only": not spec.dev,
        "app_signer": str(material.app_signer),
        "api": f"{'https' if published and spec.tls else 'http'}://{spec.host}:{spec.api_port}",
        # Published beyond loopback (through the proxy), every read needs this token too.
        "read_token_file": str(state / "read-token") if published else None,
        "admin_token_file": str(token_file),
        "flwr_home": str(state / "flwr"),
        "connection": CONNECTION,
        "nodes": spec.nodes,
        "database_url": env["DROPFLEET_DATABASE_URL"],
        "logs": str(state / "logs"),
        "spec": {**asdict(spec), "state_dir": str(state)},
    }
    (state / "fleet.json").write_text(json.dumps(info, indent=2))
    return info


def _spawn(spec: FleetSpec, state: Path, name: str, cmd: list[str], log_mode: str = "w") -> subprocess.Popen:
    """Start one fleet process in its own session and record its PID with its command line."""
    env = _env(spec, state)
    if name == "api":
        env |= {
            "DROPFLEET_ADMIN_TOKEN": (state / "admin-token").read_text(),
            "DROPFLEET_FLOWER_CONNECTION": CONNECTION,
            "DROPFLEET_FLWR_HOME": str(state / "flwr"),
            SIGNING_KEY_ENV: str(local_material(spec, state).signing_key),
            "DROPFLEET_ENVIRONMENT": "production",
        }
        if api_published(local_layout(spec, state)):  # behind the proxy: reads need a token
            env |= {
                "DROPFLEET_PUBLISHED_HOST": spec.host,
                "DROPFLEET_READ_ACCESS": "token",
                "DROPFLEET_READ_TOKEN_FILE": str(state / "read-token"),
            }
    if spec.runtime == "lean" and name.startswith("superexec-clientapp"):
        # A lean fleet's boards run what the edge kit installs, which has no numba (~100 MiB a process).
        env["NUMBA_DISABLE_JIT"] = "1"
    log = (state / "logs" / f"{name}.log").open(log_mode)
    p = subprocess.Popen(
        cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env, cwd=state
    )
    (state / "pids" / f"{name}.json").write_text(json.dumps({"pid": p.pid, "cmd": cmd}))
    return p


def _wait_superlink(
    spec: FleetSpec, state: Path, started: dict[str, subprocess.Popen], timeout: float, port: int
) -> None:
    """The SuperLink answers on `port`: its own (loopback) or the published one (through the proxy)."""
    ca = state / "certs" / "ca.crt"
    verify: str | bool = str(ca) if spec.tls else False
    host = "127.0.0.1" if port == spec.link_port else spec.host
    url = f"{'https' if spec.tls else 'http'}://{host}:{port}/health"
    what = "the SuperLink" if port == spec.link_port else "the proxy"
    _wait(lambda: httpx.get(url, verify=verify, timeout=1).is_success, what, timeout, started)


def _wait_ready(
    spec: FleetSpec, started: dict[str, subprocess.Popen], timeout: float, only: list[str] | None = None
) -> None:
    """The API answers and the SuperNodes' runtime APIs listen (only those named in `only`, if given)."""
    if only is None or "api" in only:
        _wait(
            lambda: httpx.get(f"http://{_api_address(spec)}/v1/ready", timeout=1).is_success,
            "the API",
            timeout,
            started,
        )
    for i in range(spec.nodes):
        if only is not None and f"supernode-{i}" not in only:
            continue
        port = spec.node_port_base + i
        _wait(lambda port=port: not _port_free(spec.host, port), f"supernode-{i}", timeout, started)


def _api_address(spec: FleetSpec) -> str:
    """Where the API itself listens: the published port, or loopback behind the proxy."""
    if api_published(local_layout(spec, spec.state_dir)):
        return f"127.0.0.1:{spec.api_loopback_port}"
    return f"{spec.host}:{spec.api_port}"


def restart(state_dir: Path, names: list[str] | None = None, timeout: float = 90.0) -> list[str]:
    """Restart the named fleet processes (killing them first), or by default every one that died.

    What a supervisor (compose's `restart: unless-stopped`, systemd's `Restart=`)
    does for the containers and the edge units, for the process fleet.
    """
    state = state_dir.resolve()
    try:
        recorded = json.loads((state / "fleet.json").read_text())["spec"]
    except (OSError, KeyError, ValueError) as exc:
        raise FleetError(f"{state} has no fleet to restart: {exc}") from None
    spec = FleetSpec(**{**recorded, "profiles": tuple(recorded["profiles"]), "state_dir": state})
    commands = topology(spec, local_layout(spec, state))
    unknown = sorted(set(names or ()) - set(commands))
    if unknown:
        raise FleetError(f"no fleet process named {unknown}; known: {sorted(commands)}")
    alive = status(state)
    chosen = list(names) if names else [n for n in commands if not alive.get(n, False)]
    for name in chosen:
        if alive.get(name):
            rec = json.loads((state / "pids" / f"{name}.json").read_text())
            _kill_group(rec, signal.SIGKILL)
    started: dict[str, subprocess.Popen] = {}
    for name in commands:  # in topology order: the SuperLink before those that connect to it
        if name in chosen:
            started[name] = _spawn(spec, state, name, commands[name], log_mode="a")
            if name == "superlink":
                _wait_superlink(spec, state, started, timeout, spec.link_port)
            if name == "proxy":
                _wait_superlink(spec, state, started, timeout, spec.superlink_port)
    _wait_ready(spec, started, timeout, only=chosen)
    return chosen


def _kill_group(rec: dict, sig: signal.Signals) -> None:
    try:
        os.killpg(rec["pid"], sig)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and _group_alive(rec["pid"]):
        time.sleep(0.1)


def _group_alive(pgid: int) -> bool:
    """Whether any process of the group is left (one we may not signal still counts)."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def _alive_as_started(pid: int, cmd: list[str]) -> bool:
    try:
        recorded = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return [c.decode(errors="replace") for c in recorded if c][-len(cmd) :] == cmd


def status(state_dir: Path) -> dict[str, bool]:
    """Which of the fleet's processes are still running."""
    pids = state_dir.resolve() / "pids"
    out = {}
    for f in sorted(pids.glob("*.json")) if pids.exists() else []:
        rec = json.loads(f.read_text())
        out[f.stem] = _alive_as_started(rec["pid"], rec["cmd"])
    return out


def down(state_dir: Path, timeout: float = 20.0) -> list[str]:
    """Stop every process the fleet started (and their children); returns their names."""
    pids = state_dir.resolve() / "pids"
    records = {f: json.loads(f.read_text()) for f in pids.glob("*.json")} if pids.exists() else {}
    live = {f: r for f, r in records.items() if _alive_as_started(r["pid"], r["cmd"])}
    for rec in live.values():
        try:
            os.killpg(rec["pid"], signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout
    # Until every process of each group is gone (the proxy's nginx outlives its wrapper by a moment).
    while time.monotonic() < deadline and any(_group_alive(r["pid"]) for r in live.values()):
        time.sleep(0.2)
    for rec in live.values():
        try:
            os.killpg(rec["pid"], signal.SIGKILL)
        except ProcessLookupError:
            pass
    for f in records:
        f.unlink(missing_ok=True)
    return sorted(f.stem for f in live)
