"""Secrets at rest: the root key's KDF work factor, the passphrase outside the data directory, and
the modes of the data directory and its SQLite database.

The KDF is read back with `openssl asn1parse`, not with meshbridge's own parser, and every new key
file is opened by `openssl pkey` with the passphrase alone: the file stays standard PKCS#8.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sqlite3
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from ca_server import datadir
from ca_server.keys import FileKeyBackend, KeyType, pkcs8, resolve_passphrase
from ca_server.keys import file as key_file
from tests.ca.test_cli import cli, ok

PASSPHRASE = b"correct horse battery staple"
OWASP_PBKDF2_SHA256 = 600_000


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def openssl_kdf(path: Path) -> tuple[list[str], int]:
    """The object identifiers and the PBKDF2 iteration count of an encrypted PKCS#8 file, as OpenSSL reads them."""
    out = subprocess.run(["openssl", "asn1parse", "-in", str(path)], capture_output=True, text=True, check=True).stdout
    objects = re.findall(r"OBJECT\s+:(\S+)", out)
    integers = re.findall(r"INTEGER\s+:([0-9A-F]+)", out)
    return objects, int(integers[0], 16)


def openssl_public_key(path: Path, passphrase: bytes, tmp_path: Path) -> bytes:
    secret = tmp_path / "openssl-pass"
    secret.write_bytes(passphrase + b"\n")
    proc = subprocess.run(
        ["openssl", "pkey", "-in", str(path), "-passin", f"file:{secret}", "-pubout", "-outform", "DER"],
        capture_output=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def old_format_key(path: Path, passphrase: bytes) -> ec.EllipticCurvePrivateKey:
    """A key file as earlier versions wrote it: cryptography's BestAvailableEncryption."""
    key = ec.generate_private_key(ec.SECP256R1())
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(passphrase),
        )
    )
    path.chmod(0o600)
    return key


def spki(key: ec.EllipticCurvePublicKey | object) -> bytes:
    assert isinstance(key, ec.EllipticCurvePublicKey)
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


# --------------------------------------------------------------------------------- the KDF
@pytest.mark.parametrize("key_type", [KeyType.ECDSA_P256, KeyType.RSA_3072])
def test_new_key_files_use_pbkdf2_sha256_with_600000_iterations(key_type: KeyType, tmp_path: Path) -> None:
    """Before: PBES2 / PBKDF2-HMAC-SHA256 with 2,048 iterations (OpenSSL's default, which
    BestAvailableEncryption uses for PKCS#8): ~300x cheaper to guess a passphrase against."""
    key_ref, signer = FileKeyBackend(tmp_path, PASSPHRASE).generate(key_type, "root")
    path = tmp_path / "roots" / "root.key.pem"
    objects, iterations = openssl_kdf(path)
    assert objects[:4] == ["PBES2", "PBKDF2", "hmacWithSHA256", "aes-256-cbc"]
    assert iterations >= OWASP_PBKDF2_SHA256
    assert pkcs8.kdf_of(path.read_bytes()) == pkcs8.KdfParams("pbkdf2", "hmac-sha256", iterations)
    # still a standard PKCS#8 file: OpenSSL opens it with the passphrase alone
    assert openssl_public_key(path, PASSPHRASE, tmp_path) == signer.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert FileKeyBackend(tmp_path, PASSPHRASE).load(key_ref).public_key() == signer.public_key()


def test_the_key_is_unlocked_once_per_backend(tmp_path: Path) -> None:
    """The KDF runs once per process (the backend and the authority keep the signer), so its cost
    (~0.2 s for P-256 on this 2-core machine, measured by hand) is paid at start, never per signature."""
    key_ref, _ = FileKeyBackend(tmp_path, PASSPHRASE).generate(KeyType.ECDSA_P256, "root")
    backend = FileKeyBackend(tmp_path, PASSPHRASE)
    signer = backend.load(key_ref)
    for path in (tmp_path / "roots").glob("*.key.pem"):
        path.write_text("not a key any more")  # a second decryption would fail
    for _ in range(3):
        assert backend.load(key_ref) is signer


def test_an_old_format_key_loads_and_is_re_encrypted(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Existing CAs keep working, and their key file moves to the current KDF on the next load."""
    path = tmp_path / "roots" / "root-1.key.pem"
    key = old_format_key(path, PASSPHRASE)
    assert openssl_kdf(path)[1] == 2048
    with caplog.at_level(logging.WARNING, logger="meshbridge.ca.keys"):
        signer = FileKeyBackend(tmp_path, PASSPHRASE).load("file:roots/root-1.key.pem")
    assert spki(signer.public_key()) == spki(key.public_key())
    objects, iterations = openssl_kdf(path)
    assert objects[:3] == ["PBES2", "PBKDF2", "hmacWithSHA256"] and iterations >= OWASP_PBKDF2_SHA256
    assert mode(path) == 0o600 and sorted(p.name for p in path.parent.iterdir()) == ["root-1.key.pem"]
    assert openssl_public_key(path, PASSPHRASE, tmp_path) == spki(key.public_key())
    [record] = [r for r in caplog.records if "re-encrypted" in r.getMessage()]
    assert "2,048 iterations" in record.getMessage() and "600,000 iterations" in record.getMessage()
    assert PASSPHRASE.decode() not in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="meshbridge.ca.keys"):  # current now: left as it is
        before = path.read_bytes()
        FileKeyBackend(tmp_path, PASSPHRASE).load("file:roots/root-1.key.pem")
    assert path.read_bytes() == before and not caplog.records


@pytest.mark.parametrize(
    ("option", "kdf"),
    [
        (["-v1", "PBE-SHA1-3DES"], "legacy-pbe"),
        (["-scrypt"], "scrypt"),
        (["-v2", "aes-256-cbc", "-v2prf", "hmacWithSHA512"], "pbkdf2"),
    ],
)
def test_keys_encrypted_by_openssl_load_and_are_re_encrypted(option: list[str], kdf: str, tmp_path: Path) -> None:
    """Imported keys (`init --import-key-ref`) come from other tools, with other schemes."""
    key = ec.generate_private_key(ec.SECP256R1())
    plain, path = tmp_path / "plain.pem", tmp_path / "imported" / "k.key.pem"
    plain.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    path.parent.mkdir()
    subprocess.run(
        [
            "openssl",
            "pkcs8",
            "-topk8",
            "-in",
            str(plain),
            *option,
            "-passout",
            f"pass:{PASSPHRASE.decode()}",
            "-out",
            str(path),
        ],
        check=True,
        capture_output=True,
    )
    found = pkcs8.kdf_of(path.read_bytes())
    assert found.kdf == kdf and not found.current
    signer = FileKeyBackend(tmp_path, PASSPHRASE).load("file:imported/k.key.pem")
    assert spki(signer.public_key()) == spki(key.public_key())
    assert pkcs8.kdf_of(path.read_bytes()) == pkcs8.CURRENT


def test_a_key_file_that_cannot_be_replaced_still_loads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A read-only data volume must not stop the CA from starting: it warns and goes on."""
    path = tmp_path / "roots" / "r.key.pem"
    key = old_format_key(path, PASSPHRASE)
    before = path.read_bytes()

    def read_only(*_: object) -> None:
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(key_file, "replace_file", read_only)
    with caplog.at_level(logging.WARNING, logger="meshbridge.ca.keys"):
        signer = FileKeyBackend(tmp_path, PASSPHRASE).load("file:roots/r.key.pem")
    assert spki(signer.public_key()) == spki(key.public_key())
    assert path.read_bytes() == before
    assert "outdated KDF (PBKDF2-HMAC-SHA256, 2,048 iterations)" in caplog.text
    assert "Read-only file system" in caplog.text


def test_kdf_of_refuses_what_is_not_an_encrypted_pkcs8_key() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    plain = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    for bad in (
        plain,
        b"",
        b"-----BEGIN ENCRYPTED PRIVATE KEY-----\nMAA=\n-----END ENCRYPTED PRIVATE KEY-----\n",
        b"-----BEGIN ENCRYPTED PRIVATE KEY-----\n!!\n-----END ENCRYPTED PRIVATE KEY-----\n",
    ):
        with pytest.raises(ValueError):
            pkcs8.kdf_of(bad)


# --------------------------------------------------------------------------------- the passphrase
def test_init_generates_the_passphrase_outside_the_data_directory(tmp_path: Path) -> None:
    """Before: `init --passphrase-file` only read an existing file, and a generated passphrase
    always landed in D/key-passphrase, beside the key it unlocks."""
    d, secrets_dir = tmp_path / "ca", tmp_path / "secrets"
    secrets_dir.mkdir(mode=0o700)
    passphrase_file = secrets_dir / "ca-passphrase"
    out = json.loads(ok("init", "--data-dir", str(d), "--passphrase-file", str(passphrase_file), "--json"))
    assert out["passphrase_file"] == str(passphrase_file)
    assert mode(passphrase_file) == 0o600
    passphrase = resolve_passphrase(d, passphrase_file=passphrase_file, env={})
    assert len(passphrase) == 43
    assert not (d / "key-passphrase").exists()
    for path in d.rglob("*"):  # a copy of D alone does not carry the passphrase
        assert path.is_dir() or passphrase not in path.read_bytes(), path
    [key] = (d / "roots").glob("*.key.pem")
    serialization.load_pem_private_key(key.read_bytes(), password=passphrase)
    assert json.loads(ok("audit", "verify", "--data-dir", str(d), "--json"))["ok"] is True

    other = tmp_path / "other"  # an existing file is read, never replaced
    out = json.loads(ok("init", "--data-dir", str(other), "--passphrase-file", str(passphrase_file), "--json"))
    assert resolve_passphrase(other, passphrase_file=passphrase_file, env={}) == passphrase
    missing_dir = cli(
        "init", "--data-dir", str(tmp_path / "third"), "--passphrase-file", str(tmp_path / "nowhere" / "ca-passphrase")
    )
    assert missing_dir.returncode == 2 and "cannot create passphrase file" in missing_dir.stderr


def test_init_says_when_the_passphrase_lies_in_the_data_directory(tmp_path: Path) -> None:
    text = ok("init", "--data-dir", str(tmp_path / "ca"))
    assert f"key passphrase: {tmp_path / 'ca' / 'key-passphrase'}" in text
    assert "keep it elsewhere and pass --passphrase-file" in text
    outside = ok("init", "--data-dir", str(tmp_path / "ca2"), "--passphrase-file", str(tmp_path / "pass"))
    assert "keep it elsewhere" not in outside


# --------------------------------------------------------------------------------- file modes
@pytest.fixture
def umask_022() -> Iterator[None]:
    old = os.umask(0o022)  # the usual default: files 0644, directories 0755
    try:
        yield
    finally:
        os.umask(old)


def test_init_makes_an_existing_0755_directory_and_the_database_private(tmp_path: Path, umask_022: None) -> None:
    """Before: an existing directory kept 0755 and SQLite created meshbridge.db (and so its -wal
    and -shm) 0644, readable by every local user: tokens' hashes, the audit log, every certificate."""
    d = tmp_path / "ca"
    d.mkdir()
    d.chmod(0o755)
    ok("init", "--data-dir", str(d))
    assert mode(d) == 0o700
    database = d / "meshbridge.db"
    assert mode(database) == 0o600
    with sqlite3.connect(database) as conn:  # a reader in WAL mode brings up -wal and -shm
        assert conn.execute("SELECT count(*) FROM audit").fetchone()[0] > 0
        for companion in ("meshbridge.db-wal", "meshbridge.db-shm"):
            assert mode(d / companion) == 0o600, companion
    for path in d.rglob("*"):
        expected = 0o644 if path.name == "root-cert.pem" else 0o700 if path.is_dir() else 0o600
        assert mode(path) == expected, path


def test_restore_makes_the_directory_and_the_database_private(tmp_path: Path, umask_022: None) -> None:
    d, env = tmp_path / "ca", {"MESHBRIDGE_CA_KEY_PASSPHRASE": PASSPHRASE.decode()}
    ok("init", "--data-dir", str(d), env=env)
    ok("backup", "--data-dir", str(d), "--out", str(tmp_path / "b.tar.gz"))
    target = tmp_path / "restored"
    target.mkdir()
    target.chmod(0o755)
    env["MESHBRIDGE_AUDIT_KEY_FILE"] = str(d / "audit-key")  # a secret backups do not hold
    ok("restore", "--data-dir", str(target), "--in", str(tmp_path / "b.tar.gz"), env=env)
    assert mode(target) == 0o700 and mode(target / "meshbridge.db") == 0o600


def test_make_private_sqlite_fixes_existing_files_and_ignores_other_databases(tmp_path: Path, umask_022: None) -> None:
    database = tmp_path / "x.db"
    for path in (database, tmp_path / "x.db-wal", tmp_path / "x.db-shm"):
        path.write_bytes(b"")
        assert mode(path) == 0o644
    datadir.make_private_sqlite(f"sqlite:///{database}")
    assert {mode(p) for p in tmp_path.iterdir()} == {0o600}
    datadir.make_private_sqlite("sqlite://")  # in memory
    datadir.make_private_sqlite("postgresql+psycopg://u:p@db:5432/mb")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.db", "x.db-shm", "x.db-wal"]


def test_a_directory_owned_by_another_user_is_reported_not_fatal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only the owner may chmod: a Kubernetes volume's root belongs to root, shared through fsGroup."""
    d = tmp_path / "volume"
    d.mkdir()
    d.chmod(0o2775)

    def not_owner(self: Path, mode: int) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(Path, "chmod", not_owner)
    warning = datadir.make_private_dir(d)
    assert warning is not None and "2775" in warning and "cannot be set to 0700" in warning
    monkeypatch.undo()
    assert datadir.make_private_dir(d) is None and mode(d) == 0o700
    assert datadir.make_private_dir(tmp_path / "new" / "dir") is None and mode(tmp_path / "new" / "dir") == 0o700
