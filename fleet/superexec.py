"""dropfleet's SuperExec: takes tasks from a SuperNode's or SuperLink's runtime API and starts the
launchers of fleet/launcher.py, in a process of ~40 MiB where Flower's `flower-superexec` takes ~140.

A board's SuperExec does one thing between messages: ask its SuperNode for a
task (`AcquireTask`, once a second) and start a process for it. Flower's
`flower-superexec` imports all of Flower for that (its package `__init__`
loads the ClientApp, ServerApp and simulation APIs, httpx, SQLAlchemy...):
139 MiB resident on a board whose whole RAM is 512 MB. This is the same loop
on the standard library and Flower's own generated protobuf messages,
imported without running `flwr/__init__.py`. It speaks Flower 1.42's runtime
API exactly as `flwr.supercore.superexec.run_superexec` does (the request's
path and media type, the runtime-version headers, the SuperExec HMAC headers
from `flwr.supercore.auth.superexec`); tests/fleet/test_superexec.py checks
each constant against Flower's, and every fleet test runs it against real
SuperNodes and SuperLinks.

It acquires only the two task types dropfleet runs (ClientApps, ServerApps),
so a task of any other type is never taken; it starts nothing but
`dropfleet-clientapp` / `dropfleet-serverapp`, which check the run's signature
before any of its code is unpacked. No executor plugins, no runtime
dependency installation, no health server.
"""

import argparse
import hashlib
import hmac
import http.client
import importlib.util
import logging
import os
import secrets
import signal
import ssl
import subprocess
import sys
import time
import types
from pathlib import Path
from typing import Any

logger = logging.getLogger("dropfleet.superexec")

# Flower 1.42's runtime API (flwr/supercore: runtime/runtime_http_client.py, protobuf/constants.py,
# constant.py, auth/superexec.py, superexec/run_superexec.py).
FLOWER_VERSION = "1.42.0"
ACQUIRE_PATH = "/v1/runtime/acquire-task"
ACQUIRE_METHOD = "/flwr.proto.Runtime/AcquireTask"
PROTOBUF_MEDIA_TYPE = "application/protobuf"
VERSION_HEADERS = {
    "flwr-package-name": "flwr",
    "flwr-package-version": FLOWER_VERSION,
    "flwr-component-name": "SuperExec",
}
AUTH_CONTEXT = b"superexec-auth-v1"
AUTH_HEADERS = (
    "flwr-superexec-ts",
    "flwr-superexec-nonce",
    "flwr-superexec-body-sha256",
    "flwr-superexec-signature",
)
CLIENT_APP, SERVER_APP = "flwr-clientapp", "flwr-serverapp"
COMMANDS = {CLIENT_APP: "dropfleet-clientapp", SERVER_APP: "dropfleet-serverapp"}
POLL_S = 1.0
RETRY_S = 3.0  # the SuperNode or SuperLink not up yet, or restarting
REQUEST_TIMEOUT_S = 30.0
PR_SET_DUMPABLE = 4


def flower_protos() -> types.SimpleNamespace:
    """Flower's AcquireTask messages, from its generated modules, without importing `flwr` itself
    (whose `__init__` is most of the 140 MiB): an empty package stands for it in this process,
    which imports nothing else of Flower's."""
    if "flwr" not in sys.modules:
        found = importlib.util.find_spec("flwr")
        if found is None or not found.submodule_search_locations:
            raise SystemExit("dropfleet-superexec: Flower (flwr) is not installed")
        package = types.ModuleType("flwr")
        package.__path__ = list(found.submodule_search_locations)
        sys.modules["flwr"] = package
    from flwr.proto.runtime_pb2 import AcquireTaskRequest, AcquireTaskResponse  # type: ignore[import-untyped]

    return types.SimpleNamespace(request=AcquireTaskRequest, response=AcquireTaskResponse)


def auth_headers(master_secret: bytes, body: bytes, now: float | None = None) -> dict[str, str]:
    """Flower's SuperExec HMAC headers for one AcquireTask request body."""
    key = hmac.new(master_secret, AUTH_CONTEXT, hashlib.sha256).digest()
    timestamp = int(time.time() if now is None else now)
    nonce = secrets.token_hex(16)
    digest = hashlib.sha256(body).hexdigest()
    canonical = f"method={ACQUIRE_METHOD}\nts={timestamp}\nnonce={nonce}\nbody_sha256={digest}".encode()
    signature = hmac.new(key, canonical, hashlib.sha256).hexdigest()
    return dict(zip(AUTH_HEADERS, (str(timestamp), nonce, digest, signature), strict=True))


class RuntimeApi:
    """One keep-alive HTTP(S) connection to the runtime API, for AcquireTask only."""

    def __init__(self, address: str, root_certificates: str | None, secret: bytes | None) -> None:
        host, _, port = address.rpartition(":")
        self.host, self.port = host.strip("[]"), int(port)
        self.context = ssl.create_default_context(cafile=root_certificates) if root_certificates else None
        self.secret = secret
        self.protos = flower_protos()
        self.connection: http.client.HTTPConnection | None = None

    def _connect(self) -> http.client.HTTPConnection:
        if self.connection is None:
            if self.context is not None:
                self.connection = http.client.HTTPSConnection(
                    self.host, self.port, timeout=REQUEST_TIMEOUT_S, context=self.context
                )
            else:
                self.connection = http.client.HTTPConnection(self.host, self.port, timeout=REQUEST_TIMEOUT_S)
        return self.connection

    def acquire(self, task_types: tuple[str, ...]) -> tuple[Any, str] | None:
        """The next pending task of `task_types` with its token, or None."""
        body = self.protos.request(supported_task_types=list(task_types)).SerializeToString(
            deterministic=True
        )
        headers = {"content-type": PROTOBUF_MEDIA_TYPE, "accept": PROTOBUF_MEDIA_TYPE, **VERSION_HEADERS}
        if self.secret is not None:
            headers |= auth_headers(self.secret, body)
        try:
            connection = self._connect()
            connection.request("POST", ACQUIRE_PATH, body=body, headers=headers)
            response = connection.getresponse()
            content = response.read(16 << 20)
        except (OSError, http.client.HTTPException):
            self.close()
            raise
        if response.status != 200:
            self.close()
            raise ConnectionError(f"AcquireTask: HTTP {response.status}: {content[:300]!r}")
        reply = self.protos.response()
        reply.ParseFromString(content)
        if reply.HasField("task") and reply.token:
            return reply.task, reply.token
        return None

    def close(self) -> None:
        if self.connection is not None:
            self.connection.close()
            self.connection = None


def launch_command(task_type: str, address: str, token: str, root_certificates: str | None) -> list[str]:
    """The task process, as Flower's subprocess executor builds it."""
    tls = ["--root-certificates", root_certificates] if root_certificates else ["--insecure"]
    return [COMMANDS[task_type], "--runtime-api-address", address, "--token", token, *tls,
            "--parent-pid", str(os.getpid())]  # fmt: skip


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dropfleet-superexec", description=__doc__.splitlines()[0])
    parser.add_argument("--runtime-api-address", required=True, help="HOST:PORT of the runtime API")
    tls = parser.add_mutually_exclusive_group(required=True)
    tls.add_argument("--insecure", action="store_true", help="plain HTTP (a SuperNode's loopback)")
    tls.add_argument("--root-certificates", help="CA certificate that signs the runtime API's")
    parser.add_argument("--superexec-auth-secret-file", help="the secret shared with the SuperNode/SuperLink")
    parser.add_argument("--parent-pid", type=int, help="exit when this process exits")
    return parser


def _disable_dumping() -> None:
    """Neither core dumps nor ptrace from the same user: this process holds the auth secret."""
    if sys.platform.startswith("linux"):
        import ctypes

        libc = ctypes.CDLL(None)
        if libc.prctl(PR_SET_DUMPABLE, 0) != 0:
            logger.warning("could not disable process dumping")


def run(argv: list[str]) -> None:
    """Acquire ClientApp and ServerApp tasks and start their launchers until terminated."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(asctime)s %(name)s: %(message)s")
    _disable_dumping()
    secret = None
    if args.superexec_auth_secret_file:
        secret = Path(args.superexec_auth_secret_file).expanduser().read_bytes()  # raw bytes, as Flower
        if not secret:
            raise SystemExit("dropfleet-superexec: the SuperExec auth secret file is empty")
    api = RuntimeApi(args.runtime_api_address, args.root_certificates, secret)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    children: list[subprocess.Popen] = []
    logger.info("Starting dropfleet SuperExec for %s", args.runtime_api_address)
    while True:
        children = [c for c in children if c.poll() is None]  # reap finished task processes
        if args.parent_pid is not None and not _alive(args.parent_pid):
            logger.info("parent %d exited", args.parent_pid)
            return
        try:
            acquired = api.acquire((CLIENT_APP, SERVER_APP))
        except (OSError, http.client.HTTPException, ConnectionError) as exc:
            logger.warning("runtime API at %s: %s; retrying", args.runtime_api_address, exc)
            time.sleep(RETRY_S)
            continue
        if acquired is not None:
            task, token = acquired
            if task.type not in COMMANDS:  # never asked for; refused rather than started
                logger.error("task %d of type %r refused", task.task_id, task.type)
            else:
                cmd = launch_command(task.type, args.runtime_api_address, token, args.root_certificates)
                # A ServerApp's output goes to the SuperLink (Flower suppresses it here too).
                quiet = subprocess.DEVNULL if task.type == SERVER_APP else None
                children.append(subprocess.Popen(cmd, stdout=quiet, stderr=quiet))
                logger.info("task %d (%s, run %d) started", task.task_id, task.type, task.run_id)
        time.sleep(POLL_S)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
