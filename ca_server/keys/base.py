"""The pieces shared by signing-key backends, above all by those whose key is external.

Every backend implements the core's ``KeyBackend`` port (``ca_server.core.ports``): it creates
keys (``generate``) and opens them again from the ``key_ref`` string the database keeps (``load``).
``key_ref`` never holds a secret: ``file:roots/<label>.key.pem`` (relative to the data directory)
or ``pkcs11:token=<label>;object=<label>``.

cryptography can only sign certificates and CRLs with keys it holds itself. For a key that
lives elsewhere (an HSM), ``ExternalKeySigner`` lets cryptography build the to-be-signed part with
a throwaway key of the same algorithm family (so the signatureAlgorithm inside the TBS is the
one we use), has the real key sign those bytes, and wraps ``SEQUENCE {tbs, algorithm, BIT
STRING signature}`` itself; the result is re-parsed and its signature checked before use.
"""

from __future__ import annotations

import functools
import re
from abc import ABC, abstractmethod

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.serialization import Encoding

from ca_server.core.errors import Conflict, InvalidInput, Unavailable
from ca_server.core.keytypes import (
    ROOT_KEY_TYPES,
    KeyType,
    LocalKeySigner,
    Signer,
    SignerPrivateKey,
    SignerPublicKey,
    key_type_of,
    parse_key_type,
)
from ca_server.core.ports import KeyBackend  # the port this package's backends implement

__all__ = [
    "ROOT_KEY_TYPES",
    "ExternalKeySigner",
    "KeyBackend",
    "KeyExists",
    "KeyType",
    "KeyUnavailable",
    "LocalKeySigner",
    "Signer",
    "WrongPassphrase",
    "key_ref_scheme",
    "parse_key_type",
    "validate_label",
]


class KeyUnavailable(Unavailable):
    """The signing key cannot be used now (missing, unreadable, token down, PIN refused)."""


class WrongPassphrase(KeyUnavailable):
    """An encrypted key file did not decrypt with the configured passphrase."""


class KeyExists(Conflict):
    """A key with that label already exists; backends never overwrite keys."""


_LABEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def validate_label(label: str) -> str:
    """Labels become file names and token object labels: ``[A-Za-z0-9][A-Za-z0-9._-]{0,63}``."""
    if not _LABEL.fullmatch(label):
        raise InvalidInput("key label must be 1-64 characters of letters, digits, '.', '_' or '-'")
    return label


def key_ref_scheme(key_ref: str) -> str:
    """``"file"`` or ``"pkcs11"``: which backend opens ``key_ref``."""
    scheme, sep, _ = key_ref.partition(":")
    if not sep or scheme not in ("file", "pkcs11"):
        raise InvalidInput("key reference must start with 'file:' or 'pkcs11:'")
    return scheme


# --- external keys: assembling certificates and CRLs around a signature made elsewhere ---


def _der_length(length: int) -> bytes:
    if length < 0x80:
        return bytes([length])
    body = length.to_bytes((length.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(body)]) + body


def der_tlv(tag: int, content: bytes) -> bytes:
    """One DER element with a single-byte tag."""
    return bytes([tag]) + _der_length(len(content)) + content


def _der_element_end(data: bytes, offset: int) -> tuple[int, int]:
    """(start of content, end of element) of the DER element at ``offset``."""
    first = data[offset + 1]
    if first < 0x80:
        return offset + 2, offset + 2 + first
    count = first & 0x7F
    length = int.from_bytes(data[offset + 2 : offset + 2 + count], "big")
    start = offset + 2 + count
    return start, start + length


def signature_algorithm_der(signed_der: bytes) -> bytes:
    """The outer AlgorithmIdentifier of a signed structure ``SEQUENCE {tbs, algorithm, signature}``."""
    content_start, _ = _der_element_end(signed_der, 0)
    _, tbs_end = _der_element_end(signed_der, content_start)
    _, alg_end = _der_element_end(signed_der, tbs_end)
    return signed_der[tbs_end:alg_end]


def wrap_signed(tbs: bytes, algorithm_der: bytes, signature: bytes) -> bytes:
    """``SEQUENCE {tbs, algorithm, BIT STRING signature}`` (X.509 certificate or CRL)."""
    return der_tlv(0x30, tbs + algorithm_der + der_tlv(0x03, b"\x00" + signature))


@functools.cache
def _throwaway_key(ecdsa: bool) -> SignerPrivateKey:
    """A key whose only use is letting cryptography lay out the TBS bytes; made once per process."""
    if ecdsa:
        return ec.generate_private_key(ec.SECP256R1())
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def verify_signature(public_key: SignerPublicKey, signature: bytes, data: bytes) -> None:
    """Raise InvalidSignature unless ``signature`` is ours over ``data`` (SHA-256)."""
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        public_key.verify(signature, data, ec.ECDSA(hashes.SHA256()))
    else:
        public_key.verify(signature, data, padding.PKCS1v15(), hashes.SHA256())


class ExternalKeySigner(ABC):
    """Base for signers whose private key is out of reach; subclasses implement ``sign``."""

    def __init__(self, public_key: SignerPublicKey) -> None:
        key_type = key_type_of(public_key)
        if key_type is None:
            raise KeyUnavailable("key is not ECDSA P-256/P-384 or RSA 2048/3072/4096")
        self._public_key = public_key
        self._key_type = key_type

    @property
    def key_type(self) -> KeyType:
        return self._key_type

    def public_key(self) -> SignerPublicKey:
        return self._public_key

    @abstractmethod
    def sign(self, data: bytes) -> bytes:
        """ECDSA (DER) or RSA PKCS#1 v1.5 signature with SHA-256 over ``data``."""

    def sign_certificate(self, builder: x509.CertificateBuilder) -> x509.Certificate:
        draft = builder.sign(_throwaway_key(self._key_type.is_ecdsa), hashes.SHA256())
        tbs = draft.tbs_certificate_bytes
        der = wrap_signed(tbs, signature_algorithm_der(draft.public_bytes(Encoding.DER)), self.sign(tbs))
        cert = x509.load_der_x509_certificate(der)
        self._check(cert.signature, cert.tbs_certificate_bytes, tbs)
        return cert

    def sign_crl(self, builder: x509.CertificateRevocationListBuilder) -> x509.CertificateRevocationList:
        draft = builder.sign(_throwaway_key(self._key_type.is_ecdsa), hashes.SHA256())
        tbs = draft.tbs_certlist_bytes
        der = wrap_signed(tbs, signature_algorithm_der(draft.public_bytes(Encoding.DER)), self.sign(tbs))
        crl = x509.load_der_x509_crl(der)
        self._check(crl.signature, crl.tbs_certlist_bytes, tbs)
        return crl

    def _check(self, signature: bytes, parsed_tbs: bytes, tbs: bytes) -> None:
        try:
            if parsed_tbs != tbs:
                raise InvalidSignature("TBS changed on re-parse")
            verify_signature(self._public_key, signature, tbs)
        except InvalidSignature as exc:
            raise KeyUnavailable("the external key produced a signature that does not verify") from exc
