"""The operator's signature on a run: only apps the operator signed run on the server or a board.

Flower 1.42's own app verification (`flower-supernode --trusted-entities`) only
accepts Flower Hub apps: a locally built FAB carries no verification record and
is refused outright. So dropfleet signs each run itself. The operator holds an
Ed25519 key; the submitter (the REST API) signs

    "dropfleet-app-v3" | expiry | nonce | sha256(FAB) | sha256(canonical JSON of the run-config overrides)

and passes `v3.EXPIRY.NONCE.SIGNATURE` as one more override, `app-signature`. Every task
process (the launcher in `fleet/launcher.py`, started by each SuperExec) checks
it against the public keys it trusts before the FAB is unzipped, parsed or
imported, so a run an outsider submitted, or the operator's app with overrides
the operator did not sign, never runs code. The FAB's hash covers its defaults,
so the overrides and the FAB together fix the run config every process sees.
Flower builds FABs bit for bit reproducibly (a fixed zip date), which is what
lets the submitter know the FAB's hash up front.

A signature is good for one run, started within `SIGNATURE_TTL_S` of signing:
the ServerApp's launcher refuses an expired one and claims its nonce for its
Flower run in a `SignatureLedger`, so a signed run submitted again (a replay by
whoever reaches the server's loopback Control API) is refused before any code
runs. Boards check the signature only: their ClientApp processes start every
round of a run that may last longer than the window, and a replayed run never
reaches them, because its ServerApp never starts.
"""

import base64
import contextlib
import hashlib
import json
import os
import re
import secrets
import sqlite3
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from dropfleet.common.errors import DropfleetError

SIGNATURE_KEY = "app-signature"
DOMAIN = b"dropfleet-app-v3"
VERSION = "v3"
# A signed run must start within this long of being signed (the API signs just before it submits).
SIGNATURE_TTL_S = 3600
# Where the ServerApp's launcher records the signatures it has used (set by --signature-ledger).
LEDGER_ENV = "DROPFLEET_SIGNATURE_LEDGER"
_SIGNATURE = re.compile(rf"{VERSION}\.([0-9]{{1,12}})\.([0-9a-f]{{32}})\.([A-Za-z0-9_-]{{86}}==)")
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


@dataclass(frozen=True)
class Signature:
    """A parsed `app-signature`: good until `expires` (Unix seconds), for one run (`nonce`)."""

    expires: int
    nonce: str
    raw: bytes

    @classmethod
    def parse(cls, value: object) -> "Signature":
        if not isinstance(value, str) or not value:
            raise AppSignatureError("the run is not signed by the operator (no app-signature): refused")
        # One spelling per signature: ASCII digits, a lowercase hex nonce, canonical base64 of 64 bytes.
        match = _SIGNATURE.fullmatch(value)
        if match is None:
            raise AppSignatureError(f"the run's app-signature is not a {VERSION} signature: refused")
        expires, nonce, encoded = match.groups()
        raw = base64.urlsafe_b64decode(encoded)
        return cls(int(expires), nonce, raw)


def _message(fab: bytes, overrides: Mapping[str, object], expires: int, nonce: str) -> bytes:
    unsigned = {k: v for k, v in overrides.items() if k != SIGNATURE_KEY}
    config = json.dumps(unsigned, sort_keys=True, separators=(",", ":"), allow_nan=True).encode()
    digests = [hashlib.sha256(fab).digest(), hashlib.sha256(config).digest()]
    return b"|".join([DOMAIN, str(expires).encode(), nonce.encode(), *digests])


def sign(
    key: Ed25519PrivateKey,
    fab: bytes,
    overrides: Mapping[str, object],
    now: float | None = None,
    ttl: int = SIGNATURE_TTL_S,
) -> str:
    """The `app-signature` value for one run of `fab` with exactly these run-config overrides,
    started within `ttl` seconds."""
    expires = int(time.time() if now is None else now) + ttl
    nonce = secrets.token_hex(16)
    signature = key.sign(_message(fab, overrides, expires, nonce))
    return f"{VERSION}.{expires}.{nonce}.{base64.urlsafe_b64encode(signature).decode()}"


def verify(fab: bytes, overrides: Mapping[str, object], trusted: list[Ed25519PublicKey]) -> Signature:
    """The run's signature, or AppSignatureError unless a trusted key signed this FAB with these
    overrides (which carry the signature itself); nothing of the FAB is parsed. The expiry is
    checked where a run starts (`check_fresh`), not here."""
    signature = Signature.parse(overrides.get(SIGNATURE_KEY, ""))
    message = _message(fab, overrides, signature.expires, signature.nonce)
    for key in trusted:
        try:
            key.verify(signature.raw, message)
            return signature
        except InvalidSignature:
            continue
    raise AppSignatureError(
        "the run's app-signature does not verify against the operator's keys (another app, "
        "other run-config overrides, or another signer): refused"
    )


def check_fresh(signature: Signature, now: float | None = None) -> None:
    """Refuse a signature past its expiry: a run must start within the window it was signed for."""
    now = time.time() if now is None else now
    if now > signature.expires:
        raise AppSignatureError(
            f"the run's app-signature expired {int(now - signature.expires)} s ago (a run must start "
            f"within {SIGNATURE_TTL_S} s of being signed): refused"
        )


class SignatureLedger:
    """The signatures the server has run, one Flower run each: a replay is refused.

    A small SQLite file of its own (the launcher checks it before the app, and so
    before the app's store, exists for this run). A claim checks the signature's
    expiry and its nonce in one transaction, against one clock reading, so a
    signature cannot slip between the two. Entries are dropped a whole window
    after their expiry (a clock stepped back by less than that cannot revive a
    used signature), so the file holds about two windows' worth of runs.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with contextlib.closing(self._connect()) as db:
                # Flower's run ids are unsigned 64-bit: more than SQLite's INTEGER holds, hence TEXT.
                db.execute(
                    "CREATE TABLE IF NOT EXISTS claims "
                    "(nonce TEXT PRIMARY KEY, run_id TEXT NOT NULL, expires INTEGER NOT NULL)"
                )
                db.execute("BEGIN IMMEDIATE")  # writable, not just readable: refuse to start otherwise
                db.execute("COMMIT")
        except sqlite3.Error as exc:
            raise AppSignatureError(f"the signature ledger {path} is not usable: {exc}") from None

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(self.path, timeout=30, isolation_level=None)

    def claim(self, signature: Signature, run_id: int, now: float | None = None) -> None:
        """Record that `run_id` runs under `signature`, fresh at `now`; refuse it if it has expired
        or another run used it already."""
        now = time.time() if now is None else now
        try:
            with contextlib.closing(self._connect()) as db:
                db.execute("BEGIN IMMEDIATE")  # one claim at a time, across processes
                try:
                    self._claim(db, signature, str(run_id), now)
                except BaseException:
                    db.execute("ROLLBACK")
                    raise
                db.execute("COMMIT")
        except sqlite3.Error as exc:
            raise AppSignatureError(f"the signature ledger {self.path} is not usable: {exc}") from None

    @staticmethod
    def _claim(db: sqlite3.Connection, signature: Signature, run_id: str, now: float) -> None:
        check_fresh(signature, now)
        db.execute("DELETE FROM claims WHERE expires < ?", (int(now) - SIGNATURE_TTL_S,))
        row = db.execute("SELECT run_id FROM claims WHERE nonce = ?", (signature.nonce,)).fetchone()
        if row is not None and row[0] != run_id:
            raise AppSignatureError(
                f"the run's app-signature was used by run {row[0]} already (a replay): refused"
            )
        if row is None:
            db.execute("INSERT INTO claims VALUES (?, ?, ?)", (signature.nonce, run_id, signature.expires))


def fab_for(app_dir: Path) -> bytes:
    """The FAB `flwr run APP_DIR` will submit: Flower builds it reproducibly (fixed zip dates)."""
    from flwr.cli.build import build_fab_from_disk

    return build_fab_from_disk(app_dir)
