"""A private Docker engine for the container tests: host networking only, stopped by its PID.

The daemon gets its own data root, exec root, socket and PID file, no bridge
and no iptables rules, so every byte stays on 127.0.0.1 and nothing outside
the test's directory changes. No registry is reachable here, so the base
image is built from Debian packages with mmdebstrap (the host's apt sources,
CA certificates and pip settings, which the builds inside need too).
"""

import http.server
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

BASE_IMAGE = "dropfleet-base:bookworm"
DAEMON_FLAGS = [
    "--bridge=none",
    "--iptables=false",
    "--ip6tables=false",
    "--ip-forward=false",
    "--ip-masq=false",
    "--userland-proxy=false",
    "--storage-driver=overlay2",
]
# What the base image needs beyond minbase: Python with venv and pip, useradd, CA certificates.
BASE_PACKAGES = "python3,python3-venv,python3-pip,ca-certificates,passwd"


def missing_tools() -> list[str]:
    return [t for t in ("dockerd", "docker", "docker-compose", "mmdebstrap") if shutil.which(t) is None]


@dataclass
class Engine:
    root: Path
    sock: Path
    proc: subprocess.Popen

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "DOCKER_HOST": f"unix://{self.sock}"}

    def run(self, *args: str, timeout: float = 900, check: bool = True) -> subprocess.CompletedProcess:
        done = subprocess.run(args, env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and done.returncode != 0:
            output = f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
            raise AssertionError(f"{' '.join(args[:4])} failed ({done.returncode}):\n{output}")
        return done


@contextmanager
def engine(root: Path) -> Iterator[Engine]:
    """Start dockerd under `root`; stop it (and everything it runs) by its PID afterwards."""
    root.mkdir(parents=True, exist_ok=True)
    sock = root / "docker.sock"
    log = (root / "dockerd.log").open("w")
    proc = subprocess.Popen(
        [
            "dockerd",
            *DAEMON_FLAGS,
            "--data-root",
            str(root / "data"),
            "--exec-root",
            str(root / "exec"),
            "--host",
            f"unix://{sock}",
            "--pidfile",
            str(root / "dockerd.pid"),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    eng = Engine(root, sock, proc)
    try:
        deadline = time.monotonic() + 60
        while eng.run("docker", "info", check=False, timeout=30).returncode != 0:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("dockerd did not start:\n" + (root / "dockerd.log").read_text()[-3000:])
            time.sleep(1)
        yield eng
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        log.close()
        _unmount_under(root)


def _unmount_under(root: Path) -> None:
    """dockerd leaves its default network namespace mounted under its exec root."""
    prefix = str(root.resolve()) + "/"
    mounts = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()]
    for point in sorted((m for m in mounts if m.startswith(prefix)), key=len, reverse=True):
        subprocess.run(["umount", point], capture_output=True, check=False)


def build_base_image(eng: Engine, work: Path) -> float:
    """`dropfleet-base:bookworm`: Debian minbase + Python in a venv, with the host's CA and pip settings."""
    t0 = time.monotonic()
    work.mkdir(parents=True, exist_ok=True)
    tar = work / "base.tar"
    hooks = [
        # The host's extra CA certificates (a package proxy may need them) and pip settings.
        'mkdir -p "$1/usr/local/share/ca-certificates"',
        'cp -r /usr/local/share/ca-certificates/. "$1/usr/local/share/ca-certificates/" || true',
        'chroot "$1" update-ca-certificates',
        'chroot "$1" python3 -m venv /opt/venv',
        'rm -f "$1"/usr/lib/python3*/EXTERNALLY-MANAGED',
        'cp /etc/apt/apt.conf.d/99* "$1/etc/apt/apt.conf.d/" 2>/dev/null || true',
    ]
    cmd = ["mmdebstrap", "--variant=minbase", f"--include={BASE_PACKAGES}", "--quiet"]
    for hook in hooks:
        cmd.append(f"--customize-hook={hook}")
    cmd += ["bookworm", str(tar)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        raise AssertionError(f"mmdebstrap failed:\n{done.stderr[-3000:]}")
    eng.run(
        "docker",
        "import",
        "--change",
        "ENV PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "--change",
        "ENV LANG=C.UTF-8 PIP_CERT=/etc/ssl/certs/ca-certificates.crt PIP_DISABLE_PIP_VERSION_CHECK=1",
        str(tar),
        BASE_IMAGE,
    )
    tar.unlink()
    return time.monotonic() - t0


@contextmanager
def wheel_server(directory: Path) -> Iterator[str]:
    """Serve a directory of wheels on 127.0.0.1, where a build with host networking reaches it.

    Yields the URL to give pip as --find-links."""

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

    def handler(*a: object, **k: object) -> http.server.SimpleHTTPRequestHandler:
        return Quiet(*a, directory=str(directory), **k)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
