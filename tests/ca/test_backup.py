"""Backup and restore: a round trip that keeps issuing under the same root, on both engines."""

from __future__ import annotations

import stat
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from cryptography import x509

from ca_server import runtime
from ca_server.backup import backup, restore
from ca_server.core.authority import Authority
from ca_server.core.errors import Conflict, InvalidInput
from cluster_agent import pki

CLI = [sys.executable, "-m", "ca_server.cli"]


def init_ca(data_dir: Path) -> None:
    subprocess.run([*CLI, "init", "--data-dir", str(data_dir)], check=True, capture_output=True)


def enrolled(authority: Authority, name: str) -> tuple[pki.PrivateKey, str, str]:
    made = authority.create_cluster(name=name, trust_domain=f"{name}.mesh", gateway=None, actor="test")
    key = pki.new_key()
    done = authority.enroll(cluster_name=name, bootstrap_token=made.bootstrap_token, csr_pem=pki.make_csr(key, name))
    return key, done.issued.serial, done.agent_token


@pytest.mark.parametrize("target", ["sqlite", "postgres"])
def test_round_trip_keeps_issuing_under_the_same_root(
    tmp_path: Path, target: str, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = tmp_path / "src"
    init_ca(src)
    authority = runtime.build_authority(src)
    key, serial, agent_token = enrolled(authority, "a")
    root_before = authority.list_roots()[0]
    archive = tmp_path / "ca-backup.tar.gz"
    manifest = backup(src, archive)
    assert stat.S_IMODE(archive.stat().st_mode) == 0o600
    assert manifest["tables"]["certificates"] == 1 and manifest["tables"]["audit"] >= 5
    with tarfile.open(archive) as tar:
        names = tar.getnames()
        blob = b"".join(tar.extractfile(m).read() for m in tar.getmembers() if m.isfile())  # type: ignore[union-attr]
    assert not any("passphrase" in n or "admin-token" in n for n in names)
    assert (src / "key-passphrase").read_bytes().strip() not in blob
    assert b"BEGIN ENCRYPTED PRIVATE KEY" in blob and b"BEGIN PRIVATE KEY" not in blob

    dst = tmp_path / "dst"
    url = None
    if target == "postgres":
        url = request.getfixturevalue("pg_server").create_database("restore_target")
    monkeypatch.setenv("MESHBRIDGE_CA_KEY_PASSPHRASE", (src / "key-passphrase").read_text().strip())
    monkeypatch.setenv("MESHBRIDGE_AUDIT_KEY_FILE", str(src / "audit-key"))  # a secret backups do not hold
    out = restore(archive, dst, database_url=url)
    assert out["restored"]["certificates"] == 1

    restored = runtime.build_authority(dst, database_url_override=url)
    assert [r.id for r in restored.list_roots()] == [root_before.id]
    cluster, current = restored.get_cluster("a")
    assert current is not None and current.serial == serial
    # the agent renews against the restored CA with its old key as proof: same root signs
    new_key = pki.new_key()
    csr = pki.make_csr(new_key, "a")
    issued = restored.renew(
        cluster_name=cluster.name, agent_token=agent_token, csr_pem=csr, proof_b64=pki.prove(key, csr)
    )
    cert = x509.load_pem_x509_certificate(issued.bundle.ca_cert.encode())
    root_cert = x509.load_pem_x509_certificate(root_before.cert_pem.encode())
    cert.verify_directly_issued_by(root_cert)
    rc = subprocess.run(
        [*CLI, "audit", "verify", "--data-dir", str(dst), *(["--database-url", url] if url else [])],
        capture_output=True,
        text=True,
    )
    assert rc.returncode == 0, rc.stderr


def test_restore_refuses_an_existing_ca_and_a_corrupt_archive(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "src"
    init_ca(src)
    archive = tmp_path / "b.tar.gz"
    backup(src, archive)
    with pytest.raises(Conflict, match="already holds a CA"):
        restore(archive, src)
    # flip one byte of a member: the manifest's SHA-256 catches it and nothing is left behind
    corrupt = tmp_path / "corrupt.tar.gz"
    with tarfile.open(archive) as tin, tarfile.open(corrupt, "w:gz") as tout:
        for m in tin.getmembers():
            data = tin.extractfile(m).read()  # type: ignore[union-attr]
            if m.name == "db/audit.jsonl":
                data = data.replace(b"cluster", b"clustex", 1) if b"cluster" in data else data + b" "
            m.size = len(data)
            import io

            tout.addfile(m, io.BytesIO(data))
    dst = tmp_path / "dst"
    with pytest.raises(InvalidInput, match="corrupt"):
        restore(corrupt, dst)
    assert not dst.exists()


def test_restore_with_the_wrong_passphrase_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "src"
    init_ca(src)
    archive = tmp_path / "b.tar.gz"
    backup(src, archive)
    monkeypatch.setenv("MESHBRIDGE_CA_KEY_PASSPHRASE", "not the passphrase")
    dst = tmp_path / "dst"
    with pytest.raises(Exception, match=r"passphrase|decrypt|usable"):
        restore(archive, dst)
    assert not dst.exists()


def test_a_refused_restore_into_an_existing_directory_leaves_it_as_it_was(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = tmp_path / "src"
    init_ca(src)
    archive = tmp_path / "b.tar.gz"
    backup(src, archive)
    monkeypatch.setenv("MESHBRIDGE_CA_KEY_PASSPHRASE", "not the passphrase")
    dst = tmp_path / "dst"
    dst.mkdir(mode=0o700)
    (dst / "operator-notes.txt").write_text("kept\n")
    with pytest.raises(Exception, match=r"passphrase|decrypt|usable"):
        restore(archive, dst)
    assert sorted(p.name for p in dst.iterdir()) == ["operator-notes.txt"]


def test_restore_keeps_the_protected_server_names(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The names `serve` protects (excluded from every intermediate) travel with the backup: a
    restored CA serving under the same names rotates no cluster (before, every active cluster was
    marked for rotation at the first `serve` after a restore)."""
    src = tmp_path / "src"
    init_ca(src)
    authority = runtime.build_authority(src)
    assert authority.issuance.protect_server_names(["ca.example"], actor="serve") == ["ca.example"]
    enrolled(authority, "a")
    archive = tmp_path / "ca-backup.tar.gz"
    assert backup(src, archive)["tables"]["server_names"] == 1
    monkeypatch.setenv("MESHBRIDGE_CA_KEY_PASSPHRASE", (src / "key-passphrase").read_text().strip())
    monkeypatch.setenv("MESHBRIDGE_AUDIT_KEY_FILE", str(src / "audit-key"))
    restore(archive, tmp_path / "dst")
    restored = runtime.build_authority(tmp_path / "dst")
    assert restored.issuance.protect_server_names(["ca.example"], actor="serve") == []  # already protected
    cluster, _ = restored.get_cluster("a")
    assert not cluster.rotation_pending


def test_an_archive_from_before_roles_restores_its_token_as_a_working_admin_token(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 14: an archive whose admin_tokens rows have no name, role, expiry or revocation (made
    before migration 0005) restores the init token as the admin token ``initial-<id>``."""
    src = tmp_path / "src"
    init_ca(src)
    archive = tmp_path / "ca-backup.tar.gz"
    backup(src, archive)
    old_archive = tmp_path / "old-backup.tar.gz"
    _strip_columns(archive, old_archive, "db/admin_tokens.jsonl", {"name", "role", "expires_at", "revoked_at"})
    monkeypatch.setenv("MESHBRIDGE_CA_KEY_PASSPHRASE", (src / "key-passphrase").read_text().strip())
    monkeypatch.setenv("MESHBRIDGE_AUDIT_KEY_FILE", str(src / "audit-key"))
    restore(old_archive, tmp_path / "dst")
    restored = runtime.build_authority(tmp_path / "dst")
    token = (src / "admin-token").read_text().strip()
    token_id = token.split(".")[1]
    [rec] = restored.list_admin_tokens()
    assert (rec.name, rec.role, rec.expires_at, rec.revoked_at) == (f"initial-{token_id}", "admin", None, None)
    assert restored.authorize_operator(token, role="admin", what="test") == f"admin:initial-{token_id}/{token_id}"


def _strip_columns(src: Path, dst: Path, member: str, columns: set[str]) -> None:
    """``src`` with ``columns`` removed from each row of ``member``, its digest in the manifest updated."""
    import hashlib
    import io
    import json

    with tarfile.open(src, "r:gz") as tar:
        files = {m.name: (m, tar.extractfile(m).read()) for m in tar.getmembers() if m.isfile()}  # type: ignore[union-attr]
    rows = [json.loads(line) for line in files[member][1].decode().splitlines() if line]
    body = "".join(json.dumps({k: v for k, v in r.items() if k not in columns}) + "\n" for r in rows).encode()
    manifest = json.loads(files["manifest.json"][1])
    manifest["sha256"][member] = hashlib.sha256(body).hexdigest()
    new = {**{n: d for n, (_, d) in files.items()}, member: body, "manifest.json": json.dumps(manifest).encode()}
    with tarfile.open(dst, "w:gz") as tar:
        for name, data in new.items():
            info = files[name][0]
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
