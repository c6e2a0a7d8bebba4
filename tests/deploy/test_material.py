"""A fleet's keys and certificates: each secret private from the moment it exists, kept across restarts."""

import stat

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
        *(m.node_dir(i) / f"superexec-node-{i}" for i in range(2)),
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
        names = sorted(p.name for p in (tmp_path / "n" / str(i)).iterdir())
        assert names == [f"node-{i}", f"node-{i}.pub", f"superexec-node-{i}"]
        assert mode(m.node_key(i)) == 0o600
