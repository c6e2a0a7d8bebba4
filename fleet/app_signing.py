"""The operator's signature on a run: only apps the operator signed run on the server or a board.

Flower 1.42's own app verification (`flower-supernode --trusted-entities`) only
accepts Flower Hub apps: a locally built FAB carries no verification record and
is refused outright. So dropfleet signs each run itself. The operator holds an
Ed25519 key; the submitter (the REST API) signs

    "dropfleet-app-v2" | sha256(FAB) | sha256(canonical JSON of the run-config overrides)

and passes the signature as one more override, `app-signature`. Every task
process (the launcher in `fleet/launcher.py`, started by each SuperExec) checks
it against the public keys it trusts before the FAB is unzipped, parsed or
imported, so a run an outsider submitted, or the operator's app with overrides
the operator did not sign, never runs code. The FAB's hash covers its defaults,
so the overrides and the FAB together fix the run config every process sees.
Flower builds FABs bit for bit reproducibly (a fixed zip date), which is what
lets the submitter know the FAB's hash up front.
"""

import base64
import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from dropfleet.common.errors import DropfleetError

SIGNATURE_KEY = "app-signature"
DOMAIN = b"dropfleet-app-v2"
# Where a task process finds the public keys it trusts (OpenSSH lines, one per key).
TRUSTED_KEYS_ENV = "DROPFLEET_APP_TRUSTED_KEYS"
# Development only: run any app, signed or not (a fleet started with --dev).
ALLOW_UNSIGNED_ENV = "DROPFLEET_ALLOW_UNSIGNED_APPS"
SIGNING_KEY_ENV = "DROPFLEET_APP_SIGNING_KEY"


class AppSignatureError(DropfleetError, PermissionError):
    """A run is not signed by a key this process trusts; its app must not run."""


def create_signing_key(path: Path, public: Path) -> Path:
    """The operator's Ed25519 key at `path` (PKCS8 PEM, created mode 0600) and its public key at
    `public` (OpenSSH, what boards trust); an existing key is kept, its public key rewritten."""
    path.parent.mkdir(parents=True, exist_ok=True)
    public.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        pem = Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # never readable by others
        with os.fdopen(fd, "wb") as fh:
            fh.write(pem)
    key = load_signing_key(path)
    public.write_bytes(
        key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        + b" dropfleet-app-signer\n"
    )
    return public


def load_signing_key(path: Path) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError) as exc:
        raise AppSignatureError(f"cannot read the app signing key {path}: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise AppSignatureError(f"{path} is not an Ed25519 private key")
    return key


def load_trusted_keys(path: Path) -> list[Ed25519PublicKey]:
    """Every Ed25519 public key in `path` (OpenSSH format, one per line; # comments)."""
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise AppSignatureError(f"cannot read the trusted app keys {path}: {exc}") from None
    keys = []
    for line in lines:
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            key = serialization.load_ssh_public_key(line.strip().encode())
        except ValueError as exc:
            raise AppSignatureError(f"{path}: not an OpenSSH public key: {exc}") from None
        if not isinstance(key, Ed25519PublicKey):
            raise AppSignatureError(f"{path}: only Ed25519 keys sign apps")
        keys.append(key)
    if not keys:
        raise AppSignatureError(f"{path} holds no public key")
    return keys


def _message(fab: bytes, overrides: Mapping[str, object]) -> bytes:
    unsigned = {k: v for k, v in overrides.items() if k != SIGNATURE_KEY}
    config = json.dumps(unsigned, sort_keys=True, separators=(",", ":"), allow_nan=True).encode()
    return b"|".join([DOMAIN, hashlib.sha256(fab).digest(), hashlib.sha256(config).digest()])


def sign(key: Ed25519PrivateKey, fab: bytes, overrides: Mapping[str, object]) -> str:
    """The `app-signature` value for running `fab` with exactly these run-config overrides."""
    return base64.urlsafe_b64encode(key.sign(_message(fab, overrides))).decode()


def verify(fab: bytes, overrides: Mapping[str, object], trusted: list[Ed25519PublicKey]) -> None:
    """Raise AppSignatureError unless a trusted key signed this FAB with these overrides
    (which carry the signature itself); nothing of the FAB is parsed."""
    given = overrides.get(SIGNATURE_KEY, "")
    if not isinstance(given, str) or not given:
        raise AppSignatureError("the run is not signed by the operator (no app-signature): refused")
    try:
        signature = base64.urlsafe_b64decode(given.encode())
    except ValueError:
        raise AppSignatureError("the run's app-signature is not base64: refused") from None
    message = _message(fab, overrides)
    for key in trusted:
        try:
            key.verify(signature, message)
            return
        except InvalidSignature:
            continue
    raise AppSignatureError(
        "the run's app-signature does not verify against the operator's keys (another app, "
        "other run-config overrides, or another signer): refused"
    )


def fab_for(app_dir: Path) -> bytes:
    """The FAB `flwr run APP_DIR` will submit: Flower builds it reproducibly (fixed zip dates)."""
    from flwr.cli.build import build_fab_from_disk

    return build_fab_from_disk(app_dir)
