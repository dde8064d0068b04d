"""Key types of the CA and the ``Signer`` port through which certificates and CRLs get signed.

``Signer`` lives in the core because the x509 profiles sign through it; the backends that
produce signers (encrypted file, PKCS#11) live in ``ca_server.keys``. Every signature made
through a ``Signer`` uses SHA-256: ECDSA (DER-encoded signature) or RSA PKCS#1 v1.5.
"""

from __future__ import annotations

import enum
from collections.abc import Collection
from typing import Protocol, runtime_checkable

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from ca_server.core.errors import UnsupportedKey

SignerPublicKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey
SignerPrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey

_CURVES: dict[str, type[ec.EllipticCurve]] = {
    "secp256r1": ec.SECP256R1,
    "secp384r1": ec.SECP384R1,
}


class KeyType(enum.StrEnum):
    """Key algorithms the CA knows. Roots use ``ROOT_KEY_TYPES``; RSA 2048 is for intermediates."""

    ECDSA_P256 = "ecdsa-p256"
    ECDSA_P384 = "ecdsa-p384"
    RSA_2048 = "rsa-2048"
    RSA_3072 = "rsa-3072"
    RSA_4096 = "rsa-4096"

    @property
    def is_ecdsa(self) -> bool:
        return self.value.startswith("ecdsa-")

    @property
    def curve_name(self) -> str | None:
        """The SEC curve name (``secp256r1``) for ECDSA types, else None."""
        return {"ecdsa-p256": "secp256r1", "ecdsa-p384": "secp384r1"}.get(self.value)

    @property
    def rsa_bits(self) -> int | None:
        return int(self.value.removeprefix("rsa-")) if self.value.startswith("rsa-") else None


ROOT_KEY_TYPES: frozenset[KeyType] = frozenset(
    {KeyType.ECDSA_P256, KeyType.ECDSA_P384, KeyType.RSA_3072, KeyType.RSA_4096}
)
DEFAULT_ROOT_KEY_TYPE = KeyType.ECDSA_P256


def parse_key_type(value: str, *, allowed: Collection[KeyType] = ROOT_KEY_TYPES) -> KeyType:
    """``"ecdsa-p256"`` → ``KeyType.ECDSA_P256``; UnsupportedKey naming what is accepted."""
    accepted = ", ".join(sorted(k.value for k in allowed))
    try:
        key_type = KeyType(value.strip().lower())
    except ValueError:
        key_type = None
    if key_type is None or key_type not in allowed:
        raise UnsupportedKey(f"unsupported key type {value[:40]!r}; accepted: {accepted}")
    return key_type


def key_type_of(public_key: object) -> KeyType | None:
    """The ``KeyType`` of a public key when it is exactly one of ours, else None."""
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        return {"secp256r1": KeyType.ECDSA_P256, "secp384r1": KeyType.ECDSA_P384}.get(public_key.curve.name)
    if isinstance(public_key, rsa.RSAPublicKey):
        try:
            return KeyType(f"rsa-{public_key.key_size}")
        except ValueError:
            return None
    return None


def generate_private_key(key_type: KeyType) -> SignerPrivateKey:
    """A fresh software key of ``key_type`` (RSA with e = 65537)."""
    if key_type.curve_name is not None:
        return ec.generate_private_key(_CURVES[key_type.curve_name]())
    bits = key_type.rsa_bits
    assert bits is not None  # every non-ECDSA KeyType is RSA
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


@runtime_checkable
class Signer(Protocol):
    """A CA signing key, wherever it lives. All signatures use SHA-256."""

    @property
    def key_type(self) -> KeyType: ...

    def public_key(self) -> SignerPublicKey: ...

    def sign(self, data: bytes) -> bytes:
        """Signature over ``data``: ECDSA DER or RSA PKCS#1 v1.5, SHA-256."""
        ...

    def sign_certificate(self, builder: x509.CertificateBuilder) -> x509.Certificate: ...

    def sign_crl(self, builder: x509.CertificateRevocationListBuilder) -> x509.CertificateRevocationList: ...


class LocalKeySigner:
    """Signer over a private key held in memory; signs with cryptography's native fast path."""

    __slots__ = ("_key", "_key_type", "_public_key")

    def __init__(self, private_key: SignerPrivateKey) -> None:
        public_key = private_key.public_key()
        key_type = key_type_of(public_key)
        if key_type is None:
            raise UnsupportedKey("signing key must be ECDSA P-256/P-384 or RSA 2048/3072/4096")
        self._key = private_key
        self._key_type = key_type
        self._public_key: SignerPublicKey = public_key

    @property
    def key_type(self) -> KeyType:
        return self._key_type

    def public_key(self) -> SignerPublicKey:
        return self._public_key

    def sign(self, data: bytes) -> bytes:
        if isinstance(self._key, ec.EllipticCurvePrivateKey):
            return self._key.sign(data, ec.ECDSA(hashes.SHA256()))
        return self._key.sign(data, padding.PKCS1v15(), hashes.SHA256())

    def sign_certificate(self, builder: x509.CertificateBuilder) -> x509.Certificate:
        return builder.sign(self._key, hashes.SHA256())

    def sign_crl(self, builder: x509.CertificateRevocationListBuilder) -> x509.CertificateRevocationList:
        return builder.sign(self._key, hashes.SHA256())

    def __repr__(self) -> str:
        return f"LocalKeySigner(key_type={self._key_type.value!r})"
