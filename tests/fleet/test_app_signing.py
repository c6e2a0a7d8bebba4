"""The operator's run signature: what it covers, and every way a run fails to carry it."""

import base64
import io
import os
import sqlite3
import stat
import time
import zipfile

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from flwr.common.config import get_fused_config_from_fab, parse_config_args
from flwr.supercore.run import Run

from dropfleet.fleet import app_signing
from dropfleet.fleet.app_signing import AppSignatureError
from dropfleet.fleet.flower_env import PROJECT_ROOT
from dropfleet.fleet.launcher import _take_gate_flags
from dropfleet.server.flower_control import sign_run


@pytest.fixture(scope="module")
def fab() -> bytes:
    return app_signing.fab_for(PROJECT_ROOT)


@pytest.fixture
def operator(tmp_path):
    pub = app_signing.create_signing_key(tmp_path / "keys" / "app-signing", tmp_path / "trust" / "signer.pub")
    return app_signing.load_signing_key(tmp_path / "keys" / "app-signing"), app_signing.load_trusted_keys(pub)


def test_the_fab_is_what_flwr_run_builds_and_is_reproducible(fab):
    assert app_signing.fab_for(PROJECT_ROOT) == fab  # Flower fixes the zip dates
    names = zipfile.ZipFile(io.BytesIO(fab)).namelist()
    assert "pyproject.toml" in names and "fleet/launcher.py" in names


def test_signed_overrides_verify_and_are_what_a_board_receives(fab, operator):
    key, trusted = operator
    overrides = parse_config_args(['num-server-rounds=3 strategy="fedavg" learning-rate=0.05'])
    signed = {**overrides, "app-signature": app_signing.sign(key, fab, overrides)}
    app_signing.verify(fab, signed, trusted)
    # A board fuses them with the FAB's defaults, which the FAB's hash already covers.
    fused = get_fused_config_from_fab(fab, _run(signed))
    assert fused["strategy"] == "fedavg" and fused["min-k"] == 100


def _run(overrides: dict) -> Run:
    run = Run.create_empty(1)
    run.override_config = overrides
    return run


def test_nothing_of_the_fab_is_parsed_before_it_verifies(operator):
    """A zip bomb, or no zip at all, is refused by its signature alone."""
    _, trusted = operator
    forged = f"v3.{int(time.time()) + 60}.{'0' * 32}.{base64.urlsafe_b64encode(bytes(64)).decode()}"
    with pytest.raises(AppSignatureError, match="does not verify"):
        app_signing.verify(b"PK\x03\x04 not a zip", {"app-signature": forged}, trusted)


@pytest.mark.parametrize(
    "tamper",
    [
        lambda fab, cfg: (fab + b"\0", cfg),  # another app
        lambda fab, cfg: (fab, {**cfg, "num-server-rounds": 4}),  # another config
        lambda fab, cfg: (fab, {**cfg, "message-audit": "/etc/passwd"}),  # a path the operator never set
        lambda fab, cfg: (fab, {**cfg, "app-signature": ""}),  # unsigned
        lambda fab, cfg: (fab, {k: v for k, v in cfg.items() if k != "app-signature"}),
        lambda fab, cfg: (fab, {**cfg, "app-signature": "not base64!"}),
        lambda fab, cfg: (fab, {**cfg, "app-signature": base64.urlsafe_b64encode(b"x" * 64).decode()}),
        lambda fab, cfg: (fab, {**cfg, "app-signature": 7}),
        lambda fab, cfg: (fab, {**cfg, "app-signature": _with(cfg["app-signature"], expires=2**40)}),
        lambda fab, cfg: (fab, {**cfg, "app-signature": _with(cfg["app-signature"], nonce="1" * 32)}),
        lambda fab, cfg: (fab, {**cfg, "app-signature": _with(cfg["app-signature"], nonce="xyz")}),
        lambda fab, cfg: (fab, {**cfg, "app-signature": "v2" + cfg["app-signature"][2:]}),
        lambda fab, cfg: (fab, {**cfg, "app-signature": _with(cfg["app-signature"], expires="١٢")}),
        lambda fab, cfg: (fab, {**cfg, "app-signature": _with(cfg["app-signature"], nonce="A" * 32)}),
        lambda fab, cfg: (fab, {**cfg, "app-signature": cfg["app-signature"][:-2] + "!=="}),  # junk b64
        lambda fab, cfg: (fab, {**cfg, "app-signature": cfg["app-signature"] + "\n"}),
    ],
)
def test_anything_but_the_signed_app_and_config_is_refused(fab, operator, tamper):
    key, trusted = operator
    overrides = {"num-server-rounds": 3}
    signed = {**overrides, "app-signature": app_signing.sign(key, fab, overrides)}
    other_fab, other_config = tamper(fab, signed)
    with pytest.raises(AppSignatureError, match="refused"):
        app_signing.verify(other_fab, other_config, trusted)


def _with(signature: str, expires: object = None, nonce: str | None = None) -> str:
    version, old_expires, old_nonce, raw = signature.split(".")
    return ".".join([version, str(expires or old_expires), nonce or old_nonce, raw])


def test_a_signature_expires_and_names_one_run(fab, operator):
    key, trusted = operator
    now = 1_800_000_000
    first = app_signing.verify(fab, {"app-signature": app_signing.sign(key, fab, {}, now=now)}, trusted)
    second = app_signing.verify(fab, {"app-signature": app_signing.sign(key, fab, {}, now=now)}, trusted)
    assert first.expires == now + app_signing.SIGNATURE_TTL_S and first.nonce != second.nonce
    app_signing.check_fresh(first, now=first.expires)
    with pytest.raises(AppSignatureError, match="expired 1 s ago"):
        app_signing.check_fresh(first, now=first.expires + 1)


def test_the_ledger_lets_a_fresh_signature_start_one_run_only(fab, operator, tmp_path):
    key, trusted = operator
    now = time.time()
    signature = app_signing.verify(fab, {"app-signature": app_signing.sign(key, fab, {}, now=now)}, trusted)
    ledger = app_signing.SignatureLedger(tmp_path / "store" / "signatures.db")
    ledger.claim(signature, run_id=7, now=now)
    ledger.claim(signature, run_id=7, now=now)  # the same run's ServerApp, started again
    # Another process opening the same file sees the claim (the SuperExec starts one per run).
    with pytest.raises(AppSignatureError, match="used by run 7 already"):
        app_signing.SignatureLedger(tmp_path / "store" / "signatures.db").claim(signature, run_id=8, now=now)
    # Expiry and nonce are checked together, against one clock reading: a second past its expiry
    # the signature is refused as expired, whatever the ledger holds.
    with pytest.raises(AppSignatureError, match="expired 1 s ago"):
        ledger.claim(signature, run_id=8, now=signature.expires + 1)
    # A claim is dropped a whole window after its expiry (a clock stepped back by less cannot
    # revive it): the file holds about two windows' worth of runs, however long the fleet lives.
    then = signature.expires + app_signing.SIGNATURE_TTL_S + 5
    later = app_signing.verify(fab, {"app-signature": app_signing.sign(key, fab, {}, now=then)}, trusted)
    ledger.claim(later, run_id=9, now=then)
    with sqlite3.connect(tmp_path / "store" / "signatures.db") as db:
        assert db.execute("SELECT run_id FROM claims").fetchall() == [("9",)]
    fresh = app_signing.verify(fab, {"app-signature": app_signing.sign(key, fab, {}, now=then)}, trusted)
    ledger.claim(fresh, run_id=2**64 - 1, now=then)  # Flower's run ids are unsigned 64-bit


@pytest.mark.parametrize("make", [lambda p: p.mkdir(), lambda p: p.write_bytes(b"not a database" * 100)])
def test_an_unusable_ledger_is_refused_with_the_reason(tmp_path, make):
    path = tmp_path / "signatures.db"
    make(path)
    with pytest.raises(AppSignatureError, match=r"signature ledger .* is not usable"):
        app_signing.SignatureLedger(path)


def test_another_signer_is_refused_and_any_trusted_key_is_enough(fab, operator, tmp_path):
    _, trusted = operator
    other_pub = app_signing.create_signing_key(tmp_path / "other", tmp_path / "other.pub")
    other = app_signing.load_signing_key(tmp_path / "other")
    by_other = {"app-signature": app_signing.sign(other, fab, {})}
    with pytest.raises(AppSignatureError, match="does not verify"):
        app_signing.verify(fab, by_other, trusted)
    # A key rotation: the board trusts both keys for a while.
    both = tmp_path / "both.pub"
    both.write_text((tmp_path / "trust" / "signer.pub").read_text() + "# next key\n" + other_pub.read_text())
    app_signing.verify(fab, by_other, app_signing.load_trusted_keys(both))


def test_keys_are_created_private_and_kept(tmp_path):
    private, public = tmp_path / "k" / "app-signing", tmp_path / "t" / "signer.pub"
    app_signing.create_signing_key(private, public)
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    first = private.read_bytes()
    app_signing.create_signing_key(private, public)  # a second fleet up keeps the operator's key
    assert private.read_bytes() == first and public.read_text().startswith("ssh-ed25519 ")


@pytest.mark.parametrize(
    "content, reason",
    [
        ("", "holds no public key"),
        ("# only a comment\n", "holds no public key"),
        ("ssh-ed25519 AAAA-broken\n", "not an OpenSSH public key"),
        (None, "only Ed25519"),
    ],
)
def test_a_bad_trusted_key_file_is_refused(tmp_path, content, reason):
    path = tmp_path / "trusted.pub"
    if content is None:  # a node's EC key where an app key belongs
        key = ec.generate_private_key(ec.SECP384R1()).public_key()
        content = key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        content = content.decode()
    path.write_text(content)
    with pytest.raises(AppSignatureError, match=reason):
        app_signing.load_trusted_keys(path)
    with pytest.raises(AppSignatureError):
        app_signing.load_trusted_keys(tmp_path / "missing.pub")


def test_sign_run_signs_what_flwr_run_will_submit(fab, operator, tmp_path):
    key, trusted = operator
    (tmp_path / "key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    overrides = 'num-server-rounds=2 fleet-mix="pi4-4g" learning-rate=0.05'
    signature = sign_run(str(PROJECT_ROOT), overrides, tmp_path / "key")
    submitted = parse_config_args([f"{overrides} app-signature={signature}"])  # as `flwr run` parses it
    app_signing.verify(fab, submitted, trusted)


def test_superexec_flags_set_the_gate_for_its_task_processes(tmp_path, operator, monkeypatch):
    monkeypatch.delenv(app_signing.TRUSTED_KEYS_ENV, raising=False)
    monkeypatch.delenv(app_signing.ALLOW_UNSIGNED_ENV, raising=False)
    monkeypatch.delenv(app_signing.LEDGER_ENV, raising=False)
    pub = tmp_path / "trust" / "signer.pub"
    rest = _take_gate_flags(["--insecure", "--trusted-app-keys", str(pub), "--runtime-api-address", "h:1"])
    assert rest == ["--insecure", "--runtime-api-address", "h:1"]
    assert os.environ[app_signing.TRUSTED_KEYS_ENV] == str(pub.resolve())
    assert _take_gate_flags(["--allow-unsigned-apps"]) == []
    ledger = tmp_path / "store" / "signatures.db"
    assert _take_gate_flags(["--trusted-app-keys", str(pub), "--signature-ledger", str(ledger)]) == []
    assert os.environ[app_signing.LEDGER_ENV] == str(ledger.resolve()) and ledger.exists()
    _take_gate_flags(["--allow-unsigned-apps"])  # the next SuperExec's flags alone decide
    assert app_signing.LEDGER_ENV not in os.environ
    assert os.environ[app_signing.ALLOW_UNSIGNED_ENV] == "1"
    (tmp_path / "empty.pub").write_text("")
    with pytest.raises(AppSignatureError):  # a SuperExec never starts trusting nothing by mistake
        _take_gate_flags([f"--trusted-app-keys={tmp_path / 'empty.pub'}"])
