"""Run the app on Flower's Simulation Engine with the offline pitfalls handled.

`flwr run .` is the real entry point; this wraps it so that it works on a
machine without internet and leaves nothing behind:
- runtime dependency installation off (it would `uv sync` a CUDA torch),
- telemetry and update checks off,
- a project-local FLWR_HOME whose config.toml names the local simulation
  connection and the fleet size,
- the managed local SuperLink that `flwr run` starts (and leaves running) is
  stopped afterwards.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from dropfleet.common.errors import ConfigError
from dropfleet.fleet.flower_env import PROJECT_ROOT, flower_env, write_local_connection
from dropfleet.server.flower_control import STARTED_RUN, toml_value


def _pids_with(fragment: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if fragment in cmdline:
            pids.append(int(entry.name))
    return pids


def stop_managed_superlink(flwr_home: Path, timeout: float = 10.0) -> list[int]:
    """Stop the local SuperLink (and its children) that `flwr run` started for FLWR_HOME."""
    pids = _pids_with(str(flwr_home / "local-superlink"))
    for pid in pids:
        children = _pids_with(f"--parent-pid {pid}")
        for p in [*children, pid]:
            try:
                os.kill(p, signal.SIGTERM)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(Path(f"/proc/{p}").exists() for p in pids):
        time.sleep(0.1)
    for p in pids:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return pids


@dataclass(frozen=True)
class Simulated:
    code: int  # `flwr run`'s exit code (0 even when the run itself failed: read the results)
    run_id: str | None  # the Flower run id it printed


_RAY_PROBE = """
import json, sys, ray
ray.init(address=sys.argv[1], include_dashboard=False, logging_level="ERROR")
alive = [n for n in ray.nodes() if n["Alive"]]
hosts = sorted({n["NodeManagerAddress"] for n in alive})
print(json.dumps({"nodes": len(alive), "hosts": hosts, "cpus": ray.cluster_resources().get("CPU", 0)}))
ray.shutdown()
"""


@dataclass(frozen=True)
class RayCluster:
    address: str
    nodes: int  # alive Ray nodes
    cpus: float
    hosts: tuple[str, ...]  # the addresses the nodes advertise


def check_ray_cluster(address: str, timeout: float = 90.0) -> RayCluster:
    """Attach to the Ray cluster at HOST:PORT once, or raise `ConfigError` saying why.

    Run in a child process: attaching in this one would leave it a Ray driver.
    """
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot attach to the Ray cluster at {address}: {exc}") from None
    try:
        done = subprocess.run(
            [sys.executable, "-c", _RAY_PROBE, address], capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        raise ConfigError(f"no Ray cluster answered at {address} within {timeout:.0f} s") from None
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise ConfigError(f"cannot attach to the Ray cluster at {address}: {tail[:300]}")
    info = json.loads(lines[-1])
    return RayCluster(address, int(info["nodes"]), float(info["cpus"]), tuple(info["hosts"]))


def run_simulation(
    num_supernodes: int,
    run_config: Mapping[str, object],
    flwr_home: Path,
    superlink_port: int | None = None,
    extra_env: Mapping[str, str] | None = None,
    timeout: float | None = None,
    ray_address: str | None = None,
    federation: Sequence[str] = (),
) -> Simulated:
    """`flwr run . --stream` on a fresh local simulation, its output passed through.

    With `ray_address`, the Simulation Engine attaches to that Ray cluster (RAY_ADDRESS:
    Ray fails rather than start a private one); otherwise
    Flower starts a Ray of its own on this machine. `federation` adds Flower
    federation-config items, which replace the defaults of the same key. The managed local SuperLink is
    always started fresh, with this environment.
    """
    stop_managed_superlink(flwr_home)  # one left running would keep the environment of its first start
    write_local_connection(flwr_home)
    env = flower_env(flwr_home, superlink_port=superlink_port)
    env.update(extra_env or {})
    overrides = " ".join(f"{k}={toml_value(v)}" for k, v in run_config.items())
    items = {"num-supernodes": str(num_supernodes), "client-resources-num-cpus": "1"}
    items.update(item.split("=", 1) for item in federation)  # Flower refuses a key given twice
    federation_config = " ".join(f"{k}={v}" for k, v in items.items())
    if ray_address:
        # Flower's federation config has no address; Ray's own lookup does, and with it
        # set, Ray attaches or fails (never a private Ray). No init-args-num-cpus with it.
        env["RAY_ADDRESS"] = ray_address
    cmd = [
        str(Path(sys.executable).parent / "flwr"),
        "run",
        str(PROJECT_ROOT),
        "--stream",
        "--federation-config",
        federation_config,
    ]
    if overrides:
        cmd += ["--run-config", overrides]
    run_id = None
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        with subprocess.Popen(
            cmd, env=env, cwd=PROJECT_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        ) as proc:
            assert proc.stdout is not None
            for line in proc.stdout:
                sys.stdout.write(line)
                sys.stdout.flush()
                if run_id is None and (match := STARTED_RUN.search(line)):
                    run_id = match.group(1)
                if deadline is not None and time.monotonic() > deadline:
                    proc.kill()
                    raise subprocess.TimeoutExpired(cmd, timeout or 0)
            return Simulated(proc.wait(), run_id)
    finally:
        stop_managed_superlink(flwr_home)
