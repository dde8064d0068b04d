"""PKCS#11 keys in SoftHSM2, and the certificate assembly around signatures made outside cryptography."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pkcs11
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from ca_server.core import x509profiles as xp
from ca_server.core.errors import InvalidInput
from ca_server.core.keytypes import KeyType, LocalKeySigner, SignerPrivateKey, generate_private_key
from ca_server.keys.base import (
    ExternalKeySigner,
    KeyBackend,
    KeyExists,
    KeyUnavailable,
    signature_algorithm_der,
)
from ca_server.keys.pkcs11 import (
    PIN_ENV,
    Pkcs11KeyBackend,
    Pkcs11Signer,
    format_pkcs11_ref,
    parse_pkcs11_ref,
    resolve_pkcs11_pin,
)
from tests.ca import certcheck
from tests.ca.softhsm import SoftHSM, SoftHSMToken, requires_softhsm, softhsm_token

__all__ = ["softhsm_token"]  # the fixture, imported for pytest

NOW = datetime(2026, 3, 1, 12, tzinfo=UTC)
ORG = "Example Mesh"


def backend_for(token: SoftHSMToken) -> Pkcs11KeyBackend:
    return Pkcs11KeyBackend(token.module_path, token.label, token.pin)


def make_csr(key: SignerPrivateKey) -> x509.CertificateSigningRequest:
    return x509.CertificateSigningRequestBuilder().subject_name(x509.Name([])).sign(key, hashes.SHA256())


# --- external signing without a token: the DER assembly itself -----------------------------------


class SoftwareExternalSigner(ExternalKeySigner):
    """Signs raw bytes with a software key, so the assembly path runs without an HSM."""

    def __init__(self, private_key: SignerPrivateKey) -> None:
        super().__init__(private_key.public_key())
        self._inner = LocalKeySigner(private_key)
        self.calls = 0

    def sign(self, data: bytes) -> bytes:
        self.calls += 1
        return self._inner.sign(data)


class BrokenExternalSigner(SoftwareExternalSigner):
    def sign(self, data: bytes) -> bytes:
        return super().sign(data + b"!")


@pytest.mark.parametrize("key_type", [KeyType.ECDSA_P256, KeyType.ECDSA_P384, KeyType.RSA_3072])
def test_external_signer_assembles_valid_certificates_and_crls(key_type: KeyType, tmp_path: Path) -> None:
    signer = SoftwareExternalSigner(generate_private_key(key_type))
    root = xp.build_root(signer, subject=xp.default_root_subject(ORG), now=NOW)
    inter = xp.issue_intermediate(
        csr=make_csr(ec.generate_private_key(ec.SECP256R1())),
        issuer=root,
        signer=signer,
        subject=xp.intermediate_subject("a", "a.mesh", ORG),
        trust_domain="a.mesh",
        now=NOW,
    )
    crl = xp.build_crl(
        issuer=root,
        signer=signer,
        revoked=[xp.RevokedEntry(inter.serial_number, NOW, "keyCompromise")],
        now=NOW,
        next_update=timedelta(days=1),
        crl_number=1,
    )
    assert signer.calls == 3
    expected_oid = "1.2.840.10045.4.3.2" if key_type.is_ecdsa else "1.2.840.113549.1.1.11"
    for signed in (root, inter):
        assert signed.signature_algorithm_oid.dotted_string == expected_oid
    assert crl.signature_algorithm_oid.dotted_string == expected_oid
    assert crl.is_signature_valid(signer.public_key())
    xp.verify_issued(inter, roots=[root], now=NOW)
    result = certcheck.openssl_verify_certs(tmp_path, inter, roots=[root], attime=NOW)
    assert result.ok, result.output
    assert certcheck.pkilint_errors(certcheck.pem_of(inter), f"externally signed {key_type}") == []


def test_external_signer_catches_a_bad_signature() -> None:
    signer = BrokenExternalSigner(generate_private_key(KeyType.ECDSA_P256))
    with pytest.raises(KeyUnavailable, match="does not verify"):
        xp.build_root(signer, subject=xp.default_root_subject(ORG), now=NOW)


def test_signature_algorithm_is_read_from_the_outer_structure() -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    root = xp.build_root(LocalKeySigner(key), subject=xp.default_root_subject(ORG), now=NOW)
    from cryptography.hazmat.primitives.serialization import Encoding

    assert signature_algorithm_der(root.public_bytes(Encoding.DER)) == bytes.fromhex("300d06092a864886f70d01010b0500")


# --- references and PIN -------------------------------------------------------------------------


def test_pkcs11_refs_round_trip_with_odd_labels() -> None:
    ref = format_pkcs11_ref("CA token;1", "root=2")
    assert ref == "pkcs11:token=CA%20token%3B1;object=root%3D2"
    assert parse_pkcs11_ref(ref) == ("CA token;1", "root=2")
    for bad in ("pkcs11:token=a", "file:roots/x", "pkcs11:object=b", "pkcs11:"):
        with pytest.raises(InvalidInput, match="pkcs11:token="):
            parse_pkcs11_ref(bad)


def test_resolve_pkcs11_pin(tmp_path: Path) -> None:
    pin_file = tmp_path / "pin"
    pin_file.write_text("4321\n")
    assert resolve_pkcs11_pin(env={PIN_ENV: "1234"}, pin_file=pin_file) == "1234"
    assert resolve_pkcs11_pin(env={}, pin_file=pin_file) == "4321"
    with pytest.raises(KeyUnavailable, match=PIN_ENV):
        resolve_pkcs11_pin(env={})
    pin_file.write_text("")
    with pytest.raises(KeyUnavailable, match="empty"):
        resolve_pkcs11_pin(env={}, pin_file=pin_file)


# --- SoftHSM2 ----------------------------------------------------------------------------------


@pytest.mark.softhsm
@requires_softhsm
@pytest.mark.parametrize("key_type", [KeyType.ECDSA_P256, KeyType.ECDSA_P384, KeyType.RSA_3072, KeyType.RSA_4096])
def test_hsm_root_intermediate_and_crl_verify_with_openssl(
    softhsm_token: SoftHSMToken, key_type: KeyType, tmp_path: Path
) -> None:
    key_ref, signer = backend_for(softhsm_token).generate(key_type, f"root-{key_type}")
    assert key_ref == f"pkcs11:token={softhsm_token.label};object=root-{key_type}"
    assert signer.key_type is key_type
    root = xp.build_root(signer, subject=xp.default_root_subject(ORG, label=str(key_type)), now=NOW)
    assert root.public_key() == signer.public_key()
    inter_key = ec.generate_private_key(ec.SECP256R1())
    inter = xp.issue_intermediate(
        csr=make_csr(inter_key),
        issuer=root,
        signer=signer,
        subject=xp.intermediate_subject("a", "a.mesh", ORG),
        trust_domain="a.mesh",
        now=NOW,
    )
    crl = xp.build_crl(issuer=root, signer=signer, revoked=[], now=NOW, next_update=timedelta(days=1), crl_number=1)
    assert crl.is_signature_valid(signer.public_key())
    for cert in (root, inter):
        result = certcheck.openssl_verify_certs(tmp_path, cert, roots=[root], attime=NOW)
        assert result.ok, result.output
        assert certcheck.pkilint_errors(certcheck.pem_of(cert), f"HSM {key_type}") == []
    xp.verify_issued(inter, roots=[root], now=NOW)
    if certcheck.GO is not None:
        assert certcheck.go_verify(tmp_path, inter, roots=[root], at=NOW).ok
    assert xp.verify_proof(signer.public_key(), b"proof", signer.sign(b"proof"))


@pytest.mark.softhsm
@requires_softhsm
def test_hsm_private_key_is_not_extractable(softhsm_token: SoftHSMToken) -> None:
    backend = backend_for(softhsm_token)
    backend.generate(KeyType.ECDSA_P256, "sealed-ec")
    backend.generate(KeyType.RSA_3072, "sealed-rsa")
    token = pkcs11.lib(softhsm_token.module_path).get_token(token_label=softhsm_token.label)
    # the process is already logged in (login is per application), so no PIN here
    with token.open() as session:
        for label, secret in (
            ("sealed-ec", pkcs11.Attribute.VALUE),
            ("sealed-rsa", pkcs11.Attribute.PRIVATE_EXPONENT),
        ):
            key = session.get_key(pkcs11.ObjectClass.PRIVATE_KEY, label=label)
            assert key[pkcs11.Attribute.SENSITIVE] is True
            assert key[pkcs11.Attribute.EXTRACTABLE] is False
            assert key[pkcs11.Attribute.NEVER_EXTRACTABLE] is True
            assert key[pkcs11.Attribute.ALWAYS_SENSITIVE] is True
            assert key[pkcs11.Attribute.TOKEN] is True
            with pytest.raises(pkcs11.AttributeSensitive):
                key[secret]


@pytest.mark.softhsm
@requires_softhsm
def test_hsm_key_loads_by_reference(softhsm_token: SoftHSMToken) -> None:
    key_ref, generated = backend_for(softhsm_token).generate(KeyType.ECDSA_P384, "reload")
    backend: KeyBackend = backend_for(softhsm_token)  # mypy checks the protocol
    loaded = backend.load(key_ref)
    assert isinstance(loaded, Pkcs11Signer)
    assert loaded.public_key() == generated.public_key() and loaded.key_type is KeyType.ECDSA_P384
    assert backend.load(key_ref) is loaded
    assert xp.verify_proof(generated.public_key(), b"x", loaded.sign(b"x"))
    assert "reload" in backend.describe(key_ref) and softhsm_token.label in backend.describe(key_ref)


@pytest.mark.softhsm
@requires_softhsm
def test_hsm_refuses_duplicates_and_unknown_references(softhsm_token: SoftHSMToken) -> None:
    backend = backend_for(softhsm_token)
    backend.generate(KeyType.ECDSA_P256, "taken")
    with pytest.raises(KeyExists, match="'taken' already exists"):
        backend.generate(KeyType.ECDSA_P256, "taken")
    with pytest.raises(KeyUnavailable, match="no public key 'ghost'"):
        backend.load(format_pkcs11_ref(softhsm_token.label, "ghost"))
    with pytest.raises(InvalidInput, match="names token 'elsewhere'"):
        backend.load(format_pkcs11_ref("elsewhere", "taken"))
    with pytest.raises(InvalidInput, match="key label"):
        backend.generate(KeyType.ECDSA_P256, "bad label")


@pytest.mark.softhsm
@requires_softhsm
def test_hsm_discard_destroys_the_key_pair(softhsm_token: SoftHSMToken) -> None:
    """What a failed `root add` does with the key it generated: nothing of it stays on the token."""
    backend = backend_for(softhsm_token)
    key_ref, _ = backend.generate(KeyType.ECDSA_P256, "doomed")
    backend.discard(key_ref)
    with pytest.raises(KeyUnavailable, match="'doomed'"):
        backend_for(softhsm_token).load(key_ref)
    backend.generate(KeyType.ECDSA_P256, "doomed")  # the label is free again


@pytest.mark.softhsm
@requires_softhsm
def test_hsm_wrong_pin_is_reported_without_the_pin(softhsm_token: SoftHSMToken) -> None:
    fresh = SoftHSM.shared().new_token()
    wrong = "wrong-pin-98765"
    with pytest.raises(KeyUnavailable, match="refused the PIN") as info:
        Pkcs11KeyBackend(fresh.module_path, fresh.label, wrong).generate(KeyType.ECDSA_P256, "k")
    assert wrong not in str(info.value) and fresh.pin not in str(info.value)
    with pytest.raises(KeyUnavailable, match="no PKCS#11 token labelled 'absent'"):
        Pkcs11KeyBackend(fresh.module_path, "absent", "1234").generate(KeyType.ECDSA_P256, "k")
    with pytest.raises(KeyUnavailable, match="cannot load PKCS#11 module"):
        Pkcs11KeyBackend("/nonexistent/libpkcs11.so", "x", "1234").generate(KeyType.ECDSA_P256, "k")
    # the same token cannot be used with two PINs in one process (login is process-wide)
    backend_for(softhsm_token).generate(KeyType.ECDSA_P256, "pin-check")
    with pytest.raises(KeyUnavailable, match="different PIN"):
        Pkcs11KeyBackend(softhsm_token.module_path, softhsm_token.label, wrong).load(
            format_pkcs11_ref(softhsm_token.label, "pin-check")
        )


@pytest.mark.softhsm
@requires_softhsm
def test_hsm_signer_survives_a_library_reinitialization(softhsm_token: SoftHSMToken) -> None:
    _, signer = backend_for(softhsm_token).generate(KeyType.ECDSA_P256, "survivor")
    assert xp.verify_proof(signer.public_key(), b"before", signer.sign(b"before"))
    pkcs11.lib(softhsm_token.module_path).reinitialize()  # every session handle is now stale
    assert xp.verify_proof(signer.public_key(), b"after", signer.sign(b"after"))


@pytest.mark.softhsm
@requires_softhsm
def test_hsm_reprs_hide_the_pin(softhsm_token: SoftHSMToken) -> None:
    backend = backend_for(softhsm_token)
    _, signer = backend.generate(KeyType.ECDSA_P256, "repr")
    for text in (repr(backend), repr(signer), repr(softhsm_token)):
        assert softhsm_token.pin not in text
    assert "<hidden>" in repr(backend)
