"""Run the app on Flower's Simulation Engine with the offline pitfalls handled.

`flwr run .` is the real entry point; this wraps it so that it works on a
machine without internet and leaves nothing behind:
- runtime dependency installation off (it would `uv sync` a CUDA torch),
- telemetry and update checks off,
- a project-local FLWR_HOME whose config.toml names the local simulation
  connection and the fleet size,
- the managed local SuperLink that `flwr run` starts (and leaves running) is
  stopped afterwards;
- with a log file, Flower's, Ray's and the ServerApp's output is kept there
  (colours stripped) instead of, or as well as, passed through.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
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
    log: Path | None = None  # where its output went, when run_simulation was given a log file


# Flower colours its log lines even into a pipe; a log file is read with grep and less.
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


class RunLog:
    """A run's output in a file, named by its run id: `{run_id}` in the template is replaced.

    Until the run id is known the file has a provisional name (`pending-PID` for
    the id); `name_run` renames it. Each line is flushed as it comes: the file
    can be followed (`tail -f`) while the run goes on. A run overwrites a log
    of the same name.
    """

    def __init__(self, template: str | Path) -> None:
        self.template = str(template)
        self.path = Path(self.template.replace("{run_id}", f"pending-{os.getpid()}"))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = self.path.open("w", encoding="utf-8")

    def write(self, line: str) -> None:
        self._fh.write(_ANSI.sub("", line))
        self._fh.flush()

    def name_run(self, run_id: str) -> None:
        final = Path(self.template.replace("{run_id}", run_id))
        if final != self.path:
            os.replace(self.path, final)  # the open handle keeps writing to the renamed file
            self.path = final

    def close(self) -> None:
        self._fh.close()


def log_tail(path: Path, lines: int = 20) -> list[str]:
    """The last `lines` non-blank lines of a run's log ([] when it is missing)."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return []
    return [x for x in text.splitlines() if x.strip()][-lines:]


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
    log_file: str | Path | None = None,
    echo: bool = True,
    on_output: Callable[[str, str | None], None] | None = None,
) -> Simulated:
    """`flwr run . --stream` on a fresh local simulation, its output passed through.

    With `log_file` (`{run_id}` in it is replaced: `RunLog`) the output also goes
    there, and with `echo` False only there. `on_output` is called after each
    line with the line and the run id known so far (None until `flwr run` names it).

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
    log = RunLog(log_file) if log_file is not None else None
    try:
        with subprocess.Popen(
            cmd, env=env, cwd=PROJECT_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        ) as proc:
            assert proc.stdout is not None
            for line in proc.stdout:
                if echo:
                    sys.stdout.write(line)
                    sys.stdout.flush()
                if log is not None:
                    log.write(line)
                if run_id is None and (match := STARTED_RUN.search(line)):
                    run_id = match.group(1)
                    if log is not None:
                        log.name_run(run_id)
                if on_output is not None:
                    on_output(line, run_id)
                if deadline is not None and time.monotonic() > deadline:
                    proc.kill()
                    raise subprocess.TimeoutExpired(cmd, timeout or 0)
            return Simulated(proc.wait(), run_id, log.path if log is not None else None)
    finally:
        if log is not None:
            log.close()
        stop_managed_superlink(flwr_home)
