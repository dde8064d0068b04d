"""CA keys as passphrase-encrypted PKCS#8 PEM files under the data directory.

Files are written once (mode 0600, temp file + hard link, so a crash never leaves half a key and
an existing key is never replaced) and decrypted once per process: ``load`` keeps the signer.
Keys are encrypted with PBKDF2-HMAC-SHA256 at ``pkcs8.PBKDF2_ITERATIONS`` (see ``pkcs8``); a key
file written with a weaker setting (earlier versions wrote 2,048 iterations) still loads, and ``load``
then re-encrypts it in place with the current setting, the same passphrase and the same key.
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path, PurePosixPath

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from ca_server.core.errors import InvalidInput, UnsupportedKey
from ca_server.core.keytypes import KeyType, LocalKeySigner, SignerPrivateKey, generate_private_key
from ca_server.keys import pkcs8
from ca_server.keys.base import KeyExists, KeyUnavailable, WrongPassphrase, validate_label

log = logging.getLogger("meshbridge.ca.keys")

PASSPHRASE_ENV = "MESHBRIDGE_CA_KEY_PASSPHRASE"
DEFAULT_PASSPHRASE_FILE = "key-passphrase"
KEY_DIR = "roots"
_HOW_TO_SET = f"set {PASSPHRASE_ENV}, pass --passphrase-file, or keep one in <data dir>/{DEFAULT_PASSPHRASE_FILE}"


def resolve_passphrase(
    data_dir: str | os.PathLike[str],
    *,
    passphrase_file: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] = os.environ,
    create: bool = False,
) -> bytes:
    """The key passphrase: ``$MESHBRIDGE_CA_KEY_PASSPHRASE``, else ``passphrase_file``, else
    ``<data_dir>/key-passphrase``. With ``create`` (``init``) a missing file is generated (0600);
    ``passphrase_file`` may lie outside the data directory, so that a copy of the directory does
    not carry the passphrase of the keys in it."""
    from_env = env.get(PASSPHRASE_ENV)
    if from_env:
        return from_env.encode()
    path = _passphrase_file(data_dir, passphrase_file)
    if create and not path.exists():
        return _generate_passphrase(path)
    if passphrase_file is None and not path.exists():
        raise KeyUnavailable(f"no key passphrase: {_HOW_TO_SET}")
    return _read_passphrase(path)


def passphrase_path(
    data_dir: str | os.PathLike[str],
    *,
    passphrase_file: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] = os.environ,
) -> Path | None:
    """The file ``resolve_passphrase`` reads (or generates), or None when it comes from the environment."""
    return None if env.get(PASSPHRASE_ENV) else _passphrase_file(data_dir, passphrase_file)


def _passphrase_file(data_dir: str | os.PathLike[str], passphrase_file: str | os.PathLike[str] | None) -> Path:
    return Path(passphrase_file) if passphrase_file is not None else Path(data_dir) / DEFAULT_PASSPHRASE_FILE


def _generate_passphrase(path: Path) -> bytes:
    passphrase = secrets.token_urlsafe(32).encode()
    try:
        write_new_file(path, passphrase + b"\n")
    except OSError as exc:
        raise KeyUnavailable(f"cannot create passphrase file {path}: {exc.strerror}") from exc
    return passphrase


def _read_passphrase(path: Path) -> bytes:
    try:
        passphrase = path.read_bytes().rstrip(b"\r\n")
    except OSError as exc:
        raise KeyUnavailable(f"cannot read passphrase file {path}: {exc.strerror}") from exc
    if not passphrase:
        raise KeyUnavailable(f"passphrase file {path} is empty")
    return passphrase


def write_new_file(path: Path, data: bytes) -> None:
    """Write ``data`` to a new file with mode 0600, atomically; KeyExists if ``path`` exists."""
    with _synced_temp_file(path, data) as tmp:
        try:
            os.link(tmp, path)  # unlike rename, never replaces an existing file
        except FileExistsError as exc:
            raise KeyExists(f"{path} already exists; refusing to overwrite it") from exc
    _fsync_dir(path.parent)


def replace_file(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` (mode 0600) atomically: readers see the old or the new file."""
    with _synced_temp_file(path, data) as tmp:
        os.replace(tmp, path)
    _fsync_dir(path.parent)


@contextmanager
def _synced_temp_file(path: Path, data: bytes) -> Iterator[Path]:
    """A new 0600 file beside ``path`` holding ``data`` on disk; removed on leaving unless moved."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        yield tmp
    finally:
        tmp.unlink(missing_ok=True)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class FileKeyBackend:
    """Keys in ``<data_dir>/roots/<label>.key.pem``, encrypted with ``passphrase``."""

    in_memory = True  # decrypted once, then signing never leaves the process

    def __init__(self, data_dir: str | os.PathLike[str], passphrase: bytes) -> None:
        if not passphrase:
            raise InvalidInput("key passphrase must not be empty")
        self._data_dir = Path(data_dir)
        self._passphrase = passphrase
        self._signers: dict[str, LocalKeySigner] = {}
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"FileKeyBackend(data_dir={str(self._data_dir)!r}, passphrase=<hidden>)"

    def generate(self, key_type: KeyType, label: str) -> tuple[str, LocalKeySigner]:
        relative = f"{KEY_DIR}/{validate_label(label)}.key.pem"
        key_ref = f"file:{relative}"
        path = self._data_dir / relative
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        if path.exists():
            raise KeyExists(f"{path} already exists; refusing to overwrite it")
        private_key = generate_private_key(key_type)
        write_new_file(path, pkcs8.encrypt(private_key, self._passphrase))
        signer = LocalKeySigner(private_key)
        with self._lock:
            self._signers[key_ref] = signer
        return key_ref, signer

    def load(self, key_ref: str) -> LocalKeySigner:
        with self._lock:
            cached = self._signers.get(key_ref)
        if cached is not None:
            return cached
        signer = self._decrypt(self._path(key_ref))
        with self._lock:
            return self._signers.setdefault(key_ref, signer)

    def describe(self, key_ref: str) -> str:
        return f"encrypted key file {self._path(key_ref)}"

    def discard(self, key_ref: str) -> None:
        path = self._path(key_ref)
        with self._lock:
            self._signers.pop(key_ref, None)
        path.unlink(missing_ok=True)

    def _path(self, key_ref: str) -> Path:
        scheme, _, relative = key_ref.partition(":")
        parts = PurePosixPath(relative).parts
        if scheme != "file" or not parts or PurePosixPath(relative).is_absolute() or ".." in parts:
            raise InvalidInput("file key reference must be 'file:<path relative to the data directory>'")
        return self._data_dir.joinpath(*parts)

    def _decrypt(self, path: Path) -> LocalKeySigner:
        try:
            pem = path.read_bytes()
        except OSError as exc:
            raise KeyUnavailable(f"cannot read key file {path}: {exc.strerror}") from exc
        if b"-----BEGIN ENCRYPTED PRIVATE KEY-----" not in pem:
            raise KeyUnavailable(f"key file {path} is not an encrypted PKCS#8 key")
        try:
            private_key = serialization.load_pem_private_key(pem, password=self._passphrase)
        except (ValueError, TypeError):
            # ``from None``: the library's message adds nothing, and tracebacks stay short
            raise WrongPassphrase(
                f"cannot decrypt key file {path}: wrong passphrase or damaged file ({_HOW_TO_SET})"
            ) from None
        if not isinstance(private_key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
            raise KeyUnavailable(f"key file {path} holds an unsupported key type")
        try:
            signer = LocalKeySigner(private_key)
        except UnsupportedKey as exc:
            raise KeyUnavailable(f"key file {path}: {exc.detail}") from exc
        self._rewrap_if_outdated(path, pem, private_key)
        return signer

    def _rewrap_if_outdated(self, path: Path, pem: bytes, private_key: SignerPrivateKey) -> None:
        """Re-encrypt a key file written with a weaker KDF setting; the key itself is unchanged.
        A file that cannot be replaced (read-only volume) is left as it is, with a warning."""
        try:
            before = pkcs8.kdf_of(pem)
        except ValueError:
            before = pkcs8.KdfParams(kdf="unknown")
        if before.current:
            return
        try:
            replace_file(path, pkcs8.encrypt(private_key, self._passphrase))
        except OSError as exc:
            log.warning(
                "key file %s uses an outdated KDF (%s) and could not be re-encrypted: %s", path, before, exc.strerror
            )
            return
        log.warning(
            "re-encrypted key file %s with the current KDF (%s; was %s); same key, same passphrase",
            path,
            pkcs8.CURRENT,
            before,
        )
