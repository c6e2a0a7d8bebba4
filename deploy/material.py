"""A fleet's keys and certificates, created once, each where it is needed and nowhere else.

| file | where | who reads it |
| --- | --- | --- |
| ca.crt, server.pem, server.key | `certs` | the SuperLink and the proxy (TLS) |
| ca.crt, app-signer.pub | `trust` | every board and SuperExec: public, handed to boards |
| app-signing | `signing` | the API, which signs the runs it starts |
| superexec-server | `keys` | the SuperLink and the ServerApp's SuperExec |
| node-i, node-i.pub, superexec-node-i | `node_keys` | SuperNode i (its SuperExec: the secret) |

Compose makes them `per_node`: board i's key pair in `node_keys/i`, its
SuperExec secret in `node_keys/i-secret`, each a volume of its own, so the
container that runs the board's ClientApps never sees the node key.

The process fleet (deploy/fleet.py) and compose's one-shot `certs` service
(`dropfleet certs`) both create them here. Every secret is created with its
final mode (0600, `os.open(..., 0o600)`), never chmod'ed after the fact; an
existing file is kept, so a restart keeps the fleet's identity.
"""

import os
import pwd
import secrets
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from dropfleet.deploy.certs import DEFAULT_NAMES, create_certificates
from dropfleet.fleet.app_signing import create_signing_key

APP_SIGNER = "app-signer.pub"
SIGNING_KEY = "app-signing"
SERVER_SECRET = "superexec-server"


@dataclass(frozen=True)
class Material:
    certs: Path | None  # None: TLS off (a development fleet)
    trust: Path
    signing: Path
    keys: Path
    node_keys: Path
    # Each board's files in directories of its own (`node_keys/i`, `node_keys/i-secret`).
    per_node: bool = False

    def node_dir(self, i: int) -> Path:
        return self.node_keys / str(i) if self.per_node else self.node_keys

    def node_secret_dir(self, i: int) -> Path:
        return self.node_keys / f"{i}-secret" if self.per_node else self.node_keys

    @property
    def signing_key(self) -> Path:
        return self.signing / SIGNING_KEY

    @property
    def app_signer(self) -> Path:
        return self.trust / APP_SIGNER

    def node_key(self, i: int) -> Path:
        return self.node_dir(i) / f"node-{i}"


def run_as(user: str, dirs: Iterable[Path]) -> None:
    """Started as root: give `dirs` (created if missing) to `user`, then become that user for good.

    Compose's `certs` one-shot needs this: a board's key volumes are mounted at paths the
    image cannot create ahead of time (one per board), and Docker makes such mount points
    root's. Everything is then created by `user`, with its final mode, as without this step.
    """
    entry = pwd.getpwnam(user)
    if os.geteuid() != 0:
        if os.geteuid() != entry.pw_uid:
            raise PermissionError(f"asked to run as {user}, but started as uid {os.geteuid()}, not root")
        return
    for d in dirs:
        d.mkdir(parents=True, exist_ok=True)
        os.chown(d, entry.pw_uid, entry.pw_gid)
    os.setgroups([])
    os.setgid(entry.pw_gid)
    os.setuid(entry.pw_uid)  # last: from here on nothing runs as root


def write_secret(path: Path, data: bytes) -> Path:
    """A secret file created with its final mode (0600): never readable by others, not even briefly."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    return path


def _node_key(path: Path) -> None:
    """An EC P-384 key pair for SuperNode authentication (OpenSSH format), as Flower expects."""
    if path.exists():
        return
    key = ec.generate_private_key(ec.SECP384R1())
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    write_secret(path, pem)
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    path.with_suffix(".pub").write_bytes(public + b"\n")


def _random_secret(path: Path) -> None:
    if not path.exists():
        write_secret(path, secrets.token_urlsafe(32).encode())


def create(material: Material, nodes: int, names: tuple[str, ...] = DEFAULT_NAMES) -> None:
    """Everything a fleet of `nodes` SuperNodes needs; what exists already is kept."""
    if material.certs is not None:
        tls = create_certificates(material.certs, names=tuple(dict.fromkeys((*names, *DEFAULT_NAMES))))
        material.trust.mkdir(parents=True, exist_ok=True)
        if tls["ca"].resolve() != (material.trust / "ca.crt").resolve():
            shutil.copyfile(tls["ca"], material.trust / "ca.crt")
    create_signing_key(material.signing_key, material.app_signer)
    _random_secret(material.keys / SERVER_SECRET)
    for i in range(nodes):
        _node_key(material.node_key(i))
        _random_secret(material.node_secret_dir(i) / f"superexec-node-{i}")
