"""A fleet's keys and certificates: each secret private from the moment it exists, kept across restarts."""

import os
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from dropfleet.deploy.material import Material, create


def mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_secrets_are_private_public_files_are_not_and_a_restart_keeps_them(tmp_path):
    m = Material(
        certs=tmp_path / "certs",
        trust=tmp_path / "trust",
        signing=tmp_path / "signing",
        keys=tmp_path / "keys",
        node_keys=tmp_path / "node-keys",
    )
    create(m, nodes=2)
    secrets = [
        m.certs / "server.key",
        m.signing_key,
        m.keys / "superexec-server",
        *(m.node_key(i) for i in range(2)),
        *(m.node_secret_dir(i) / f"superexec-node-{i}" for i in range(2)),
    ]
    assert all(mode(p) == 0o600 for p in secrets), {str(p): oct(mode(p)) for p in secrets}
    assert sorted(p.name for p in m.trust.iterdir()) == ["app-signer.pub", "ca.crt"]  # what boards get
    before = {p: p.read_bytes() for p in secrets}
    create(m, nodes=2)
    assert {p: p.read_bytes() for p in secrets} == before


def test_a_regenerated_server_key_never_inherits_an_old_files_mode(tmp_path):
    m = Material(tmp_path / "certs", tmp_path / "t", tmp_path / "s", tmp_path / "k", tmp_path / "n")
    create(m, nodes=1)
    key = m.certs / "server.key"
    key.chmod(0o644)
    (m.certs / "server.pem").unlink()  # a partial set: everything is made again
    create(m, nodes=1)
    assert mode(key) == 0o600


def test_per_node_material_puts_each_boards_files_in_a_directory_of_its_own(tmp_path):
    dirs = [tmp_path / name for name in ("c", "t", "s", "k", "n")]
    m = Material(*dirs, per_node=True)
    create(m, nodes=2)
    for i in range(2):
        assert sorted(p.name for p in (tmp_path / "n" / str(i)).iterdir()) == [f"node-{i}", f"node-{i}.pub"]
        assert [p.name for p in (tmp_path / "n" / f"{i}-secret").iterdir()] == [f"superexec-node-{i}"]
        assert mode(m.node_key(i)) == 0o600


@pytest.mark.skipif(os.geteuid() != 0, reason="hands directories over as root does (compose's certs)")
def test_certs_started_as_root_hands_every_directory_over_and_creates_nothing_as_root():
    base = Path(tempfile.mkdtemp(dir="/tmp"))  # reachable by another user, unlike pytest's tmp
    try:
        base.chmod(0o755)
        args = [f"--{name}={base / name}" for name in ("out", "trust", "signing", "keys", "node-keys")]
        done = subprocess.run(
            [str(Path(sys.executable).parent / "dropfleet"), "certs", "--nodes", "2", "--per-node", *args,
             "--drop-to", "nobody"],
            capture_output=True, text=True, timeout=120, env={**os.environ, "HOME": str(base)},
        )  # fmt: skip
        assert done.returncode == 0, done.stderr + done.stdout
        made = [p for p in base.rglob("*") if p.is_file()]
        assert len(made) > 8 and {p.stat().st_uid for p in made} == {65534}  # nobody's, all of them
        assert mode(base / "node-keys" / "1-secret" / "superexec-node-1") == 0o600
    finally:
        shutil.rmtree(base)


def test_the_certificate_names_the_host_the_fleet_is_published_as(tmp_path):
    from cryptography import x509

    args = [f"--{name}={tmp_path / name}" for name in ("out", "trust", "signing", "keys", "node-keys")]
    done = subprocess.run(
        [str(Path(sys.executable).parent / "dropfleet"), "certs", "--nodes", "1", *args,
         "--name", "fleet.example.org", "--name", ""],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr + done.stdout
    cert = x509.load_pem_x509_certificate((tmp_path / "out" / "server.pem").read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {"fleet.example.org", "localhost", "superlink"} <= set(names.get_values_for_type(x509.DNSName))
