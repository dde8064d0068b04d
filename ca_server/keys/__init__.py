"""Signing-key backends: passphrase-encrypted files (``file``) and PKCS#11 tokens (``pkcs11``).

``ca_server.keys.pkcs11`` imports python-pkcs11, so it is not imported here; import it where a
PKCS#11 backend is configured.
"""

from ca_server.core.keytypes import (
    DEFAULT_ROOT_KEY_TYPE,
    ROOT_KEY_TYPES,
    KeyType,
    LocalKeySigner,
    Signer,
    key_type_of,
    parse_key_type,
)
from ca_server.keys.base import (
    ExternalKeySigner,
    KeyBackend,
    KeyExists,
    KeyUnavailable,
    WrongPassphrase,
    key_ref_scheme,
    validate_label,
)
from ca_server.keys.file import PASSPHRASE_ENV, FileKeyBackend, resolve_passphrase

__all__ = [
    "DEFAULT_ROOT_KEY_TYPE",
    "PASSPHRASE_ENV",
    "ROOT_KEY_TYPES",
    "ExternalKeySigner",
    "FileKeyBackend",
    "KeyBackend",
    "KeyExists",
    "KeyType",
    "KeyUnavailable",
    "LocalKeySigner",
    "Signer",
    "WrongPassphrase",
    "key_ref_scheme",
    "key_type_of",
    "parse_key_type",
    "resolve_passphrase",
    "validate_label",
]
