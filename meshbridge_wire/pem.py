"""The PEM forms both sides of the status report read: a trust bundle's fingerprints (what
`ServedIn.bundle` holds) and the CRLs of a concatenated CRL file (`ca-crl.pem`, `GET /v1/crl`)."""

from __future__ import annotations

import hashlib

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

__all__ = ["certificate_fingerprints", "load_crls"]

_CRL_END = "-----END X509 CRL-----"


def certificate_fingerprints(pem: str) -> list[str]:
    """SHA-256 of each certificate's DER in ``pem``, lowercase hex, in the bundle's order ([] for
    text without a certificate)."""
    certs = x509.load_pem_x509_certificates(pem.encode()) if "BEGIN CERTIFICATE" in pem else []
    return [hashlib.sha256(c.public_bytes(Encoding.DER)).hexdigest() for c in certs]


def load_crls(pem: str) -> list[x509.CertificateRevocationList]:
    """Every CRL in a concatenation of PEM CRLs, in order (ValueError for one that does not parse)."""
    blocks = [b + _CRL_END + "\n" for b in pem.split(_CRL_END) if "-----BEGIN X509 CRL-----" in b]
    return [x509.load_pem_x509_crl(b.encode()) for b in blocks]
