"""Checks for adopting an organisation's own PKI: an existing root, or an issuing CA below an
offline root (``meshbridge-ca init --import-cert``)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization

from ca_server.core.errors import InvalidInput
from ca_server.core.keytypes import ROOT_KEY_TYPES, Signer, key_type_of


def _spki(key: object) -> bytes:
    der = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)  # type: ignore[attr-defined]
    return bytes(der)


def check_importable_ca(
    cert: x509.Certificate, chain: Sequence[x509.Certificate], signer: Signer, *, now: datetime
) -> None:
    """The imported CA must be able to sign our pathlen:0 cluster intermediates: CA:TRUE with
    keyCertSign and room in its path length, within validity, its key matching, and ``chain``
    leading by valid signatures to a self-signed root whose path lengths allow it."""
    if key_type_of(cert.public_key()) not in ROOT_KEY_TYPES:
        raise InvalidInput("the imported CA's key must be ECDSA P-256/P-384 or RSA 3072/4096")
    if _spki(cert.public_key()) != _spki(signer.public_key()):
        raise InvalidInput("the imported key does not match the imported certificate")
    if not (cert.not_valid_before_utc <= now < cert.not_valid_after_utc):
        raise InvalidInput("the imported certificate is not valid now")
    path = [cert, *chain]
    for depth, ca in enumerate(path):
        try:
            bc = ca.extensions.get_extension_for_class(x509.BasicConstraints).value
            ku = ca.extensions.get_extension_for_class(x509.KeyUsage).value
        except x509.ExtensionNotFound as exc:
            raise InvalidInput(f"certificate {depth} of the imported chain lacks basicConstraints or keyUsage") from exc
        if not bc.ca or not ku.key_cert_sign:
            raise InvalidInput(f"certificate {depth} of the imported chain is not a CA with keyCertSign")
        if depth == 0 and not ku.crl_sign:  # it signs the CRLs of everything it issues
            raise InvalidInput("the imported CA's keyUsage lacks cRLSign: it could not sign valid CRLs")
        # below this CA come `depth` CAs of the chain plus our cluster intermediate
        if bc.path_length is not None and bc.path_length < depth + 1:
            raise InvalidInput(
                f"certificate {depth} of the imported chain has pathLenConstraint {bc.path_length}; "
                f"it needs at least {depth + 1} to sign cluster intermediates below it"
            )
        issuer = path[depth + 1] if depth + 1 < len(path) else ca
        if ca.issuer != issuer.subject:
            raise InvalidInput(
                f"certificate {depth} of the imported chain is not issued by the next one: "
                "give the chain in order, up to the self-signed root"
            )
        try:
            ca.verify_directly_issued_by(issuer)
        except (InvalidSignature, ValueError, TypeError) as exc:
            raise InvalidInput(f"certificate {depth} of the imported chain has a bad signature") from exc
    top = path[-1]
    if top.issuer != top.subject:
        raise InvalidInput("the imported chain must end with a self-signed root")
