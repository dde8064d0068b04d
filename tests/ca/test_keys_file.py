"""Encrypted key files and passphrase resolution."""

from __future__ import annotations

import stat
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from ca_server.core import x509profiles as xp
from ca_server.core.errors import CAError, InvalidInput, Unavailable, UnsupportedKey
from ca_server.keys import (
    PASSPHRASE_ENV,
    ROOT_KEY_TYPES,
    FileKeyBackend,
    KeyBackend,
    KeyExists,
    KeyType,
    KeyUnavailable,
    LocalKeySigner,
    Signer,
    WrongPassphrase,
    key_ref_scheme,
    parse_key_type,
    resolve_passphrase,
)
from ca_server.keys.file import passphrase_path, write_new_file

PASSPHRASE = b"correct horse battery staple"
NOW = datetime(2026, 3, 1, tzinfo=UTC)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("key_type", sorted(ROOT_KEY_TYPES))
def test_generate_writes_an_encrypted_0600_key_that_loads_again(key_type: KeyType, tmp_path: Path) -> None:
    key_ref, signer = FileKeyBackend(tmp_path, PASSPHRASE).generate(key_type, "root-1")
    assert key_ref == "file:roots/root-1.key.pem"
    path = tmp_path / "roots" / "root-1.key.pem"
    assert mode(path) == 0o600 and mode(path.parent) == 0o700
    pem = path.read_bytes()
    assert pem.startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----")
    assert [p.name for p in path.parent.iterdir()] == ["root-1.key.pem"]  # no temp file left

    loaded = FileKeyBackend(tmp_path, PASSPHRASE).load(key_ref)
    assert isinstance(loaded, Signer) and isinstance(loaded, LocalKeySigner)
    assert loaded.key_type is key_type
    assert loaded.public_key() == signer.public_key()
    root = xp.build_root(loaded, subject=xp.default_root_subject("Acme"), now=NOW)
    xp.verify_issued(root, roots=[root], now=NOW)
    assert xp.verify_proof(signer.public_key(), b"data", loaded.sign(b"data"))


def test_load_decrypts_once_and_keeps_the_signer(tmp_path: Path) -> None:
    key_ref, generated = FileKeyBackend(tmp_path, PASSPHRASE).generate(KeyType.ECDSA_P256, "r")
    backend: KeyBackend = FileKeyBackend(tmp_path, PASSPHRASE)  # mypy checks the protocol
    first = backend.load(key_ref)
    (tmp_path / "roots" / "r.key.pem").unlink()  # a second load must not touch the file
    assert backend.load(key_ref) is first
    assert first is not generated


def test_generate_refuses_to_overwrite(tmp_path: Path) -> None:
    backend = FileKeyBackend(tmp_path, PASSPHRASE)
    backend.generate(KeyType.ECDSA_P256, "root")
    before = (tmp_path / "roots" / "root.key.pem").read_bytes()
    with pytest.raises(KeyExists, match="refusing to overwrite"):
        FileKeyBackend(tmp_path, PASSPHRASE).generate(KeyType.ECDSA_P384, "root")
    assert (tmp_path / "roots" / "root.key.pem").read_bytes() == before


def test_write_new_file_never_replaces(tmp_path: Path) -> None:
    target = tmp_path / "secret"
    write_new_file(target, b"one")
    with pytest.raises(KeyExists):
        write_new_file(target, b"two")
    assert target.read_bytes() == b"one" and mode(target) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["secret"]


def test_wrong_passphrase_is_a_clear_error_without_the_passphrase(tmp_path: Path) -> None:
    key_ref, _ = FileKeyBackend(tmp_path, PASSPHRASE).generate(KeyType.ECDSA_P256, "root")
    wrong = b"Tr0ub4dor&3-wrong"
    with pytest.raises(WrongPassphrase, match="wrong passphrase") as info:
        FileKeyBackend(tmp_path, wrong).load(key_ref)
    assert isinstance(info.value, Unavailable) and isinstance(info.value, CAError)
    text = f"{info.value} {info.value.detail} {info.value!r} {info.value.__cause__!r}"
    assert wrong.decode() not in text and PASSPHRASE.decode() not in text
    assert PASSPHRASE_ENV in info.value.detail  # says how to supply the right one


def test_unencrypted_or_missing_or_foreign_key_files_are_unavailable(tmp_path: Path) -> None:
    backend = FileKeyBackend(tmp_path, PASSPHRASE)
    (tmp_path / "roots").mkdir()
    plain = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    (tmp_path / "roots" / "plain.key.pem").write_bytes(plain)
    with pytest.raises(KeyUnavailable, match="not an encrypted PKCS#8 key"):
        backend.load("file:roots/plain.key.pem")
    with pytest.raises(KeyUnavailable, match="cannot read key file"):
        backend.load("file:roots/missing.key.pem")
    p521 = ec.generate_private_key(ec.SECP521R1()).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(PASSPHRASE),
    )
    (tmp_path / "roots" / "p521.key.pem").write_bytes(p521)
    with pytest.raises(KeyUnavailable, match="ECDSA P-256/P-384 or RSA"):
        backend.load("file:roots/p521.key.pem")


@pytest.mark.parametrize(
    "key_ref",
    ["file:/etc/shadow", "file:../outside.pem", "file:roots/../../x", "file:", "pkcs11:token=a;object=b"],
)
def test_key_refs_outside_the_data_dir_are_rejected(key_ref: str, tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="relative to the data directory"):
        FileKeyBackend(tmp_path, PASSPHRASE).load(key_ref)


@pytest.mark.parametrize("label", ["", "../x", "a/b", ".hidden", "x" * 65, "sp ace"])
def test_bad_labels_are_rejected(label: str, tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="key label"):
        FileKeyBackend(tmp_path, PASSPHRASE).generate(KeyType.ECDSA_P256, label)


def test_reprs_hide_secrets(tmp_path: Path) -> None:
    backend = FileKeyBackend(tmp_path, PASSPHRASE)
    _, signer = backend.generate(KeyType.ECDSA_P256, "root")
    assert PASSPHRASE.decode() not in repr(backend) and "<hidden>" in repr(backend)
    assert repr(signer) == "LocalKeySigner(key_type='ecdsa-p256')"
    assert "roots" in backend.describe("file:roots/root.key.pem")
    with pytest.raises(InvalidInput):
        FileKeyBackend(tmp_path, b"")


# --- passphrase resolution ---------------------------------------------------------------------


def test_passphrase_from_env_wins(tmp_path: Path) -> None:
    (tmp_path / "key-passphrase").write_text("from-default-file\n")
    other = tmp_path / "other"
    other.write_text("from-file\n")
    env = {PASSPHRASE_ENV: "from-env"}
    assert resolve_passphrase(tmp_path, passphrase_file=other, env=env) == b"from-env"
    assert resolve_passphrase(tmp_path, passphrase_file=other, env={}) == b"from-file"
    assert resolve_passphrase(tmp_path, env={}) == b"from-default-file"
    assert resolve_passphrase(tmp_path, env={PASSPHRASE_ENV: ""}) == b"from-default-file"


def test_passphrase_created_on_init(tmp_path: Path) -> None:
    with pytest.raises(KeyUnavailable, match=PASSPHRASE_ENV):
        resolve_passphrase(tmp_path, env={})
    created = resolve_passphrase(tmp_path, env={}, create=True)
    path = tmp_path / "key-passphrase"
    assert mode(path) == 0o600
    assert path.read_bytes() == created + b"\n"
    assert len(created) == 43 and created.decode().replace("-", "").replace("_", "").isalnum()
    assert resolve_passphrase(tmp_path, env={}, create=True) == created  # kept, not regenerated
    assert resolve_passphrase(tmp_path, env={}) == created


def test_init_generates_a_missing_passphrase_file_where_it_is_told(tmp_path: Path) -> None:
    data_dir, outside = tmp_path / "ca", tmp_path / "secrets" / "ca-passphrase"
    data_dir.mkdir()
    outside.parent.mkdir()
    with pytest.raises(KeyUnavailable, match="cannot read passphrase file"):
        resolve_passphrase(data_dir, passphrase_file=outside, env={})  # only init creates it
    created = resolve_passphrase(data_dir, passphrase_file=outside, env={}, create=True)
    assert outside.read_bytes() == created + b"\n" and mode(outside) == 0o600
    assert list(data_dir.iterdir()) == []
    assert resolve_passphrase(data_dir, passphrase_file=outside, env={}, create=True) == created  # kept
    assert passphrase_path(data_dir, passphrase_file=outside, env={}) == outside
    assert passphrase_path(data_dir, env={}) == data_dir / "key-passphrase"
    assert passphrase_path(data_dir, passphrase_file=outside, env={PASSPHRASE_ENV: "x"}) is None
    with pytest.raises(KeyUnavailable, match="cannot create passphrase file"):
        resolve_passphrase(data_dir, passphrase_file=tmp_path / "missing-dir" / "p", env={}, create=True)


def test_passphrase_file_problems(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.write_text("\n")
    with pytest.raises(KeyUnavailable, match="is empty"):
        resolve_passphrase(tmp_path, passphrase_file=empty, env={})
    with pytest.raises(KeyUnavailable, match="cannot read passphrase file"):
        resolve_passphrase(tmp_path, passphrase_file=tmp_path / "nope", env={})
    assert not (tmp_path / "key-passphrase").exists()  # an explicit file never falls back


# --- key types and references --------------------------------------------------------------------


def test_parse_key_type() -> None:
    assert parse_key_type("ecdsa-p256") is KeyType.ECDSA_P256
    assert parse_key_type(" RSA-4096 ") is KeyType.RSA_4096
    with pytest.raises(UnsupportedKey, match="accepted: ecdsa-p256, ecdsa-p384, rsa-3072, rsa-4096"):
        parse_key_type("rsa-2048")  # fine for intermediates, not for roots
    assert parse_key_type("rsa-2048", allowed=set(KeyType)) is KeyType.RSA_2048
    with pytest.raises(UnsupportedKey, match="ed25519"):
        parse_key_type("ed25519")


def test_key_ref_scheme() -> None:
    assert key_ref_scheme("file:roots/a.key.pem") == "file"
    assert key_ref_scheme("pkcs11:token=t;object=o") == "pkcs11"
    with pytest.raises(InvalidInput):
        key_ref_scheme("vault:foo")


def test_file_signer_issues_fast(tmp_path: Path) -> None:
    """Per-issue overhead stays tiny: a loaded file key signs on cryptography's native path."""
    key_ref, _ = FileKeyBackend(tmp_path, PASSPHRASE).generate(KeyType.ECDSA_P256, "root")
    signer = FileKeyBackend(tmp_path, PASSPHRASE).load(key_ref)
    root = xp.build_root(signer, subject=xp.default_root_subject("Acme"), now=NOW)
    verifier = xp.ChainVerifier([root])
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .sign(ec.generate_private_key(ec.SECP256R1()), hashes.SHA256())
    )
    subject = xp.intermediate_subject("a", "a.mesh", "Acme")
    count = 200
    started = time.perf_counter()
    for _ in range(count):
        cert = xp.issue_intermediate(
            csr=csr, issuer=root, signer=signer, subject=subject, trust_domain="a.mesh", now=NOW
        )
        verifier.verify(cert, NOW)
    per_second = count / (time.perf_counter() - started)
    print(f"issue+verify: {per_second:.0f} intermediates/s on one core")
    assert per_second > 300  # ~2,500/s measured; the bound only catches a lost fast path


def test_a_root_whose_transaction_fails_leaves_no_key_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`root add` generates the key before its transaction commits: a failure must not leave an
    orphan encrypted key behind (nor a cached signer for a root that does not exist)."""
    from ca_server.core.authority import Authority
    from ca_server.storage.migrate import upgrade
    from ca_server.storage.repository import SqlStore

    store = SqlStore(f"sqlite:///{tmp_path / 'ca.db'}")
    upgrade(store.engine)
    authority = Authority(store, FileKeyBackend(tmp_path, PASSPHRASE))
    authority.init_root(key_type=KeyType.ECDSA_P256)
    keys_before = sorted(p.name for p in (tmp_path / "roots").iterdir())
    roots_before = [r.id for r in authority.list_roots()]

    def fail(*_: object, **__: object) -> None:
        raise RuntimeError("database went away")

    monkeypatch.setattr(authority.crls, "sign", fail)
    with pytest.raises(RuntimeError):
        authority.add_root(key_type=KeyType.ECDSA_P256, actor="admin:test")
    assert sorted(p.name for p in (tmp_path / "roots").iterdir()) == keys_before
    assert [r.id for r in authority.list_roots()] == roots_before
    assert set(authority.rootkeys.signers) <= set(roots_before)
    store.dispose()
