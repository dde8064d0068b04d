"""A self-signed certificate for 127.0.0.1 and its key, written as PEM files, for tests that serve
or trust one over loopback TLS."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from ipaddress import ip_address
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat
from cryptography.x509.oid import NameOID


def loopback_cert_files(cert_path: Path, key_path: Path, *, name: str = "127.0.0.1", ca: bool = False) -> None:
    """Write a P-256 certificate for the IP address 127.0.0.1, issued by itself (valid from 5
    minutes ago for a day), to ``cert_path`` and its key (PKCS#8, unencrypted) to ``key_path``.
    ``ca``: marked a CA (``BasicConstraints``), for clients that take it as their own root."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.now(UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ip_address("127.0.0.1"))]), critical=False)
    )
    if ca:
        builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
    cert_path.write_bytes(builder.sign(key, hashes.SHA256()).public_bytes(Encoding.PEM))
    key_path.write_bytes(key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()))
