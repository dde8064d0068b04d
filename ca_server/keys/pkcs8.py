"""Encrypted PKCS#8 keys with a current PBKDF2 work factor, and the KDF settings of a key file.

cryptography's ``BestAvailableEncryption`` writes PKCS#8 as PBES2 with PBKDF2-HMAC-SHA256 and
OpenSSL's default of 2,048 iterations, and offers no way to raise that count for PKCS#8. ``encrypt``
writes the same standard structure (RFC 8018 PBES2: PBKDF2-HMAC-SHA256 and AES-256-CBC) with
``PBKDF2_ITERATIONS``, so a key file stays an ``ENCRYPTED PRIVATE KEY`` PEM that cryptography and
``openssl pkey`` open with the passphrase alone. Decryption is left to cryptography.
``kdf_of`` reads which KDF, PRF and iteration count a file was written with, so that a key written
with an older setting can be re-encrypted.
"""

from __future__ import annotations

import base64
import os
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes, padding, serialization
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.pbkdf2 import PBKDF2HMAC

from ca_server.core.keytypes import SignerPrivateKey

# OWASP Password Storage Cheat Sheet (2023) for PBKDF2-HMAC-SHA256; ~0.2 s, once per process.
PBKDF2_ITERATIONS = 600_000
PEM_LABEL = "ENCRYPTED PRIVATE KEY"

# DER of the object identifiers used (tag 0x06, length, content)
_PBES2 = bytes.fromhex("06092a864886f70d01050d")  # 1.2.840.113549.1.5.13
_PBKDF2 = bytes.fromhex("06092a864886f70d01050c")  # 1.2.840.113549.1.5.12
_HMAC_SHA1 = bytes.fromhex("06082a864886f70d0207")  # 1.2.840.113549.2.7, PBKDF2's default PRF
_HMAC_SHA256 = bytes.fromhex("06082a864886f70d0209")  # 1.2.840.113549.2.9
_HMAC_SHA384 = bytes.fromhex("06082a864886f70d020a")  # 1.2.840.113549.2.10
_HMAC_SHA512 = bytes.fromhex("06082a864886f70d020b")  # 1.2.840.113549.2.11
_AES256_CBC = bytes.fromhex("060960864801650304012a")  # 2.16.840.1.101.3.4.1.42
_NULL = b"\x05\x00"
_SCRYPT = bytes.fromhex("06092b06010401da47040b")  # 1.3.6.1.4.1.11591.4.11
_NAMES = {
    _PBKDF2: "pbkdf2",
    _SCRYPT: "scrypt",
    _HMAC_SHA1: "hmac-sha1",
    _HMAC_SHA256: "hmac-sha256",
    _HMAC_SHA384: "hmac-sha384",
    _HMAC_SHA512: "hmac-sha512",
}

_SEQUENCE, _INTEGER, _OCTET_STRING = 0x30, 0x02, 0x04


@dataclass(frozen=True)
class KdfParams:
    """How a key file's encryption key is derived from the passphrase."""

    kdf: str  # "pbkdf2", "scrypt", "unknown", or "legacy-pbe" (PBES1, PKCS#12 PBE: not PBES2)
    prf: str | None = None  # "hmac-sha256", "hmac-sha1" … for PBKDF2
    iterations: int | None = None  # for PBKDF2

    @property
    def current(self) -> bool:
        """True for what ``encrypt`` writes today (or a stronger PBKDF2 count)."""
        return self.kdf == "pbkdf2" and self.prf == "hmac-sha256" and (self.iterations or 0) >= PBKDF2_ITERATIONS

    def __str__(self) -> str:
        if self.kdf == "pbkdf2":
            return f"PBKDF2-{(self.prf or '?').upper()}, {self.iterations:,} iterations"
        return self.kdf


CURRENT = KdfParams(kdf="pbkdf2", prf="hmac-sha256", iterations=PBKDF2_ITERATIONS)  # what ``encrypt`` writes


def encrypt(private_key: SignerPrivateKey, passphrase: bytes, *, iterations: int = PBKDF2_ITERATIONS) -> bytes:
    """``private_key`` as a PEM ``ENCRYPTED PRIVATE KEY``: PBES2, PBKDF2-HMAC-SHA256, AES-256-CBC."""
    plain = private_key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    salt, iv = os.urandom(16), os.urandom(16)
    key = PBKDF2HMAC(hashes.SHA256(), length=32, salt=salt, iterations=iterations).derive(passphrase)
    padder = padding.PKCS7(algorithms.AES.block_size).padder()
    encryptor = Cipher(algorithms.AES(key), modes.CBC(iv)).encryptor()
    ciphertext = encryptor.update(padder.update(plain) + padder.finalize()) + encryptor.finalize()
    pbkdf2_params = _seq(_tlv(_OCTET_STRING, salt), _integer(iterations), _seq(_HMAC_SHA256, _NULL))
    pbes2_params = _seq(_seq(_PBKDF2, pbkdf2_params), _seq(_AES256_CBC, _tlv(_OCTET_STRING, iv)))
    info = _seq(_seq(_PBES2, pbes2_params), _tlv(_OCTET_STRING, ciphertext))
    return _pem(info)


def kdf_of(pem: bytes) -> KdfParams:
    """The KDF settings of a PEM ``ENCRYPTED PRIVATE KEY``; ValueError if it is not one."""
    try:
        return _kdf_of(_unpem(pem))
    except IndexError as exc:
        raise ValueError(f"malformed {PEM_LABEL}") from exc


def _kdf_of(der: bytes) -> KdfParams:
    info = _children(der, _SEQUENCE)
    algorithm = _children(info[0], _SEQUENCE)
    scheme = algorithm[0]
    if scheme != _PBES2:
        return KdfParams(kdf="legacy-pbe")
    kdf_id, *kdf_params = _children(_children(algorithm[1], _SEQUENCE)[0], _SEQUENCE)
    if kdf_id != _PBKDF2:
        return KdfParams(kdf=_NAMES.get(kdf_id, "unknown"))
    fields = _children(kdf_params[0], _SEQUENCE)  # salt, iterationCount, keyLength?, prf?
    prf = _HMAC_SHA1
    if fields[-1][0] == _SEQUENCE:
        prf = _children(fields[-1], _SEQUENCE)[0]
    return KdfParams(kdf="pbkdf2", prf=_NAMES.get(prf, "unknown"), iterations=_read_integer(fields[1]))


# ----------------------------------------------------------------------------- DER, just enough
def _tlv(tag: int, content: bytes) -> bytes:
    size = len(content)
    if size < 0x80:
        return bytes([tag, size]) + content
    length = size.to_bytes((size.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(length)]) + length + content


def _seq(*parts: bytes) -> bytes:
    return _tlv(_SEQUENCE, b"".join(parts))


def _integer(value: int) -> bytes:
    return _tlv(_INTEGER, value.to_bytes(value.bit_length() // 8 + 1, "big"))  # non-negative, minimal


def _read_integer(element: bytes) -> int:
    if element[0] != _INTEGER:
        raise ValueError("expected an INTEGER")
    return int.from_bytes(_split(element)[1], "big", signed=True)


def _split(data: bytes) -> tuple[int, bytes, bytes]:
    """(tag, content, rest) of the first DER element of ``data``; the element itself is
    ``data[:len(data) - len(rest)]``."""
    if len(data) < 2:
        raise ValueError("truncated DER")
    tag, size, offset = data[0], data[1], 2
    if size & 0x80:
        count = size & 0x7F
        if not 0 < count <= 4 or len(data) < 2 + count:
            raise ValueError("bad DER length")
        size, offset = int.from_bytes(data[2 : 2 + count], "big"), 2 + count
    if len(data) < offset + size:
        raise ValueError("truncated DER")
    return tag, data[offset : offset + size], data[offset + size :]


def _children(element: bytes, tag: int) -> list[bytes]:
    """The encoded elements inside ``element``, which must carry ``tag``."""
    found, content, _ = _split(element)
    if found != tag:
        raise ValueError(f"expected DER tag {tag:#x}, found {found:#x}")
    children = []
    while content:
        _, _, rest = _split(content)
        children.append(content[: len(content) - len(rest)])
        content = rest
    return children


def _pem(der: bytes) -> bytes:
    body = base64.b64encode(der)
    lines = [body[i : i + 64] for i in range(0, len(body), 64)]
    return b"\n".join([f"-----BEGIN {PEM_LABEL}-----".encode(), *lines, f"-----END {PEM_LABEL}-----".encode(), b""])


def _unpem(pem: bytes) -> bytes:
    begin, end = f"-----BEGIN {PEM_LABEL}-----".encode(), f"-----END {PEM_LABEL}-----".encode()
    start, stop = pem.find(begin), pem.find(end)
    if start < 0 or stop < start:
        raise ValueError(f"not a PEM {PEM_LABEL}")
    return base64.b64decode(b"".join(pem[start + len(begin) : stop].split()), validate=True)
