"""CA keys generated and used inside a PKCS#11 token (an HSM, or SoftHSM2 in tests).

Private keys are created on the token with ``CKA_SENSITIVE`` and without ``CKA_EXTRACTABLE``,
so they never leave it; signing happens on the token. ECDSA is done as ``CKM_ECDSA`` over a
SHA-256 digest computed here (every token has it; SoftHSM2 has no ``CKM_ECDSA_SHA256``) and the
raw ``r || s`` turned into DER; RSA uses ``CKM_SHA256_RSA_PKCS``.

A PKCS#11 login belongs to the whole process, not to one session (a second ``C_Login`` fails,
and ``C_Logout`` on any session logs out all of them), so backends share one logged-in session
per (module, token), serialized by a lock. A session that went stale (token re-inserted, library
re-initialized) is reopened once before giving up with ``KeyUnavailable``.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TypeVar
from urllib.parse import quote, unquote

import pkcs11
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from pkcs11 import Attribute, Mechanism, MechanismFlag, ObjectClass
from pkcs11.types import SignMixin
from pkcs11.util.ec import encode_named_curve_parameters

from ca_server.core.errors import InvalidInput
from ca_server.core.keytypes import KeyType, SignerPublicKey
from ca_server.keys.base import ExternalKeySigner, KeyExists, KeyUnavailable, validate_label

DEFAULT_MODULE_PATH = "/usr/lib/softhsm/libsofthsm2.so"
PIN_ENV = "MESHBRIDGE_PKCS11_PIN"

T = TypeVar("T")

# curve OID (dotted) and coordinate size in bytes, by SEC name
_CURVES: dict[str, tuple[str, int, ec.EllipticCurve]] = {
    "secp256r1": ("1.2.840.10045.3.1.7", 32, ec.SECP256R1()),
    "secp384r1": ("1.3.132.0.34", 48, ec.SECP384R1()),
}
# errors after which a fresh session may succeed
_STALE_SESSION_ERRORS: tuple[type[pkcs11.PKCS11Error], ...] = (
    pkcs11.SessionHandleInvalid,
    pkcs11.SessionClosed,
    pkcs11.DeviceRemoved,
    pkcs11.TokenNotPresent,
    pkcs11.ObjectHandleInvalid,
    pkcs11.KeyHandleInvalid,
    pkcs11.UserNotLoggedIn,
)


def resolve_pkcs11_pin(*, pin_file: str | os.PathLike[str] | None = None, env: Mapping[str, str] = os.environ) -> str:
    """The token user PIN: ``$MESHBRIDGE_PKCS11_PIN``, else the first line of ``pin_file``."""
    from_env = env.get(PIN_ENV)
    if from_env:
        return from_env
    if pin_file is None:
        raise KeyUnavailable(f"no PKCS#11 PIN: set {PIN_ENV} or pass a PIN file")
    try:
        pin = Path(pin_file).read_text().strip("\r\n")
    except (OSError, UnicodeDecodeError) as exc:
        raise KeyUnavailable(f"cannot read PKCS#11 PIN file {pin_file}") from exc
    if not pin:
        raise KeyUnavailable(f"PKCS#11 PIN file {pin_file} is empty")
    return pin


def format_pkcs11_ref(token_label: str, object_label: str) -> str:
    """``pkcs11:token=<label>;object=<label>`` (values percent-encoded as in RFC 7512)."""
    return f"pkcs11:token={quote(token_label, safe='')};object={quote(object_label, safe='')}"


def parse_pkcs11_ref(key_ref: str) -> tuple[str, str]:
    """(token label, object label) of a ``pkcs11:`` key reference."""
    scheme, _, rest = key_ref.partition(":")
    fields = dict(part.partition("=")[::2] for part in rest.split(";"))
    if scheme != "pkcs11" or not fields.get("token") or not fields.get("object"):
        raise InvalidInput("PKCS#11 key reference must be 'pkcs11:token=<label>;object=<label>'")
    return unquote(fields["token"]), unquote(fields["object"])


class _TokenConnection:
    """The process's one logged-in session on a token, and the private-key handles found on it."""

    def __init__(self, module_path: str, token_label: str, pin: str) -> None:
        self.module_path = module_path
        self.token_label = token_label
        self._pin = pin
        self._lock = threading.RLock()
        self._session: pkcs11.Session | None = None
        self._private_keys: dict[str, SignMixin] = {}

    def __repr__(self) -> str:
        return f"_TokenConnection(token={self.token_label!r}, pin=<hidden>)"

    def pin_matches(self, pin: str) -> bool:
        return hmac.compare_digest(_digest(self._pin), _digest(pin))

    def run(self, what: str, operation: Callable[[pkcs11.Session], T]) -> T:
        """Run ``operation`` on the session, reopening it once if it went stale."""
        with self._lock:
            for attempt in (1, 2):
                session = self._open()
                try:
                    return operation(session)
                except _STALE_SESSION_ERRORS as exc:
                    self._reset()
                    if attempt == 2:
                        raise self._unavailable(what, exc) from exc
                except pkcs11.PKCS11Error as exc:
                    raise self._unavailable(what, exc) from exc
            raise AssertionError("unreachable")

    def private_key(self, session: pkcs11.Session, label: str) -> SignMixin:
        key = self._private_keys.get(label)
        if key is None:
            try:
                found = session.get_key(ObjectClass.PRIVATE_KEY, label=label)
            except pkcs11.NoSuchKey:
                raise KeyUnavailable(f"no private key {label!r} on PKCS#11 token {self.token_label!r}") from None
            if not isinstance(found, SignMixin):
                raise KeyUnavailable(f"PKCS#11 key {label!r} cannot sign")
            key = self._private_keys[label] = found
        return key

    def _open(self) -> pkcs11.Session:
        if self._session is None:
            try:
                lib = pkcs11.lib(self.module_path)
            except (OSError, RuntimeError) as exc:
                raise KeyUnavailable(f"cannot load PKCS#11 module {self.module_path}") from exc
            try:
                token = lib.get_token(token_label=self.token_label)
                self._session = token.open(rw=True, user_pin=self._pin)
            except pkcs11.NoSuchToken:
                raise KeyUnavailable(f"no PKCS#11 token labelled {self.token_label!r}") from None
            except (pkcs11.PinIncorrect, pkcs11.PinLocked, pkcs11.PinExpired, pkcs11.PinLenRange):
                raise KeyUnavailable(f"PKCS#11 token {self.token_label!r} refused the PIN") from None
            except pkcs11.PKCS11Error as exc:
                raise self._unavailable("open a session", exc) from exc
        return self._session

    def _reset(self) -> None:
        session, self._session = self._session, None
        self._private_keys.clear()
        if session is not None:
            with contextlib.suppress(pkcs11.PKCS11Error):  # a stale handle has nothing left to release
                session.close()

    def _unavailable(self, what: str, exc: Exception) -> KeyUnavailable:
        return KeyUnavailable(f"PKCS#11 token {self.token_label!r}: cannot {what} ({type(exc).__name__})")


def _digest(pin: str) -> bytes:
    return hashlib.sha256(pin.encode()).digest()


_connections: dict[tuple[str, str], _TokenConnection] = {}
_connections_lock = threading.Lock()


def _connection(module_path: str, token_label: str, pin: str) -> _TokenConnection:
    with _connections_lock:
        conn = _connections.get((module_path, token_label))
        if conn is None:
            conn = _connections[(module_path, token_label)] = _TokenConnection(module_path, token_label, pin)
        elif not conn.pin_matches(pin):
            raise KeyUnavailable(f"PKCS#11 token {token_label!r} is already in use with a different PIN")
        return conn


class Pkcs11Signer(ExternalKeySigner):
    """Signs on the token with the private key labelled ``label``."""

    def __init__(self, connection: _TokenConnection, label: str, public_key: SignerPublicKey) -> None:
        super().__init__(public_key)
        self._connection = connection
        self._label = label

    def __repr__(self) -> str:
        return f"Pkcs11Signer(token={self._connection.token_label!r}, object={self._label!r})"

    def sign(self, data: bytes) -> bytes:
        return self._connection.run("sign", lambda session: self._sign(session, data))

    def _sign(self, session: pkcs11.Session, data: bytes) -> bytes:
        key = self._connection.private_key(session, self._label)
        if not self.key_type.is_ecdsa:
            return bytes(key.sign(data, mechanism=Mechanism.SHA256_RSA_PKCS))
        digest = hashes.Hash(hashes.SHA256())
        digest.update(data)
        raw = key.sign(digest.finalize(), mechanism=Mechanism.ECDSA)
        half = len(raw) // 2
        return encode_dss_signature(int.from_bytes(raw[:half], "big"), int.from_bytes(raw[half:], "big"))


class Pkcs11KeyBackend:
    """Keys inside the token ``token_label`` of the PKCS#11 module at ``module_path``."""

    in_memory = False  # every signature is a call into the token

    def __init__(self, module_path: str | None, token_label: str, pin: str) -> None:
        if not token_label or not pin:
            raise InvalidInput("PKCS#11 backend needs a token label and a PIN")
        self._module_path = module_path or DEFAULT_MODULE_PATH
        self._token_label = token_label
        self._pin = pin
        self._signers: dict[str, Pkcs11Signer] = {}

    def __repr__(self) -> str:
        return f"Pkcs11KeyBackend(module_path={self._module_path!r}, token={self._token_label!r}, pin=<hidden>)"

    @property
    def _conn(self) -> _TokenConnection:
        return _connection(self._module_path, self._token_label, self._pin)

    def generate(self, key_type: KeyType, label: str) -> tuple[str, Pkcs11Signer]:
        validate_label(label)
        conn = self._conn
        public_key = conn.run("generate a key", lambda session: _generate(session, key_type, label))
        key_ref = format_pkcs11_ref(self._token_label, label)
        signer = self._signers[key_ref] = Pkcs11Signer(conn, label, public_key)
        return key_ref, signer

    def load(self, key_ref: str) -> Pkcs11Signer:
        cached = self._signers.get(key_ref)
        if cached is not None:
            return cached
        label = self._object_label(key_ref)
        conn = self._conn
        public_key = conn.run("read a public key", lambda session: _read_public_key(session, label))
        conn.run("find a private key", lambda session: conn.private_key(session, label))
        return self._signers.setdefault(key_ref, Pkcs11Signer(conn, label, public_key))

    def describe(self, key_ref: str) -> str:
        label = self._object_label(key_ref)
        return f"PKCS#11 key {label!r} on token {self._token_label!r} ({self._module_path})"

    def discard(self, key_ref: str) -> None:
        label = self._object_label(key_ref)
        self._signers.pop(key_ref, None)

        def destroy(session: pkcs11.Session) -> None:
            for obj in list(session.get_objects({Attribute.LABEL: label})):
                obj.destroy()

        self._conn.run("destroy a key", destroy)

    def _object_label(self, key_ref: str) -> str:
        token_label, label = parse_pkcs11_ref(key_ref)
        if token_label != self._token_label:
            raise InvalidInput(f"key reference names token {token_label!r}, backend uses {self._token_label!r}")
        return label


def _generate(session: pkcs11.Session, key_type: KeyType, label: str) -> SignerPublicKey:
    if any(True for _ in session.get_objects({Attribute.LABEL: label})):
        raise KeyExists(f"an object labelled {label!r} already exists on the token")
    key_id = os.urandom(16)
    private_template = {
        Attribute.SENSITIVE: True,
        Attribute.EXTRACTABLE: False,
        Attribute.PRIVATE: True,
    }
    common = {
        "id": key_id,
        "label": label,
        "store": True,
        "capabilities": MechanismFlag.SIGN | MechanismFlag.VERIFY,
        "private_template": private_template,
    }
    if key_type.curve_name is not None:
        oid = _CURVES[key_type.curve_name][0]
        params = session.create_domain_parameters(
            pkcs11.KeyType.EC, {Attribute.EC_PARAMS: encode_named_curve_parameters(oid)}, local=True
        )
        public, _ = params.generate_keypair(**common)  # type: ignore[arg-type]
    else:
        public, _ = session.generate_keypair(pkcs11.KeyType.RSA, key_type.rsa_bits, **common)
    return _public_key_of(public)


def _read_public_key(session: pkcs11.Session, label: str) -> SignerPublicKey:
    try:
        public = session.get_key(ObjectClass.PUBLIC_KEY, label=label)
    except pkcs11.NoSuchKey:
        raise KeyUnavailable(f"no public key {label!r} on the PKCS#11 token") from None
    assert isinstance(public, pkcs11.PublicKey)
    return _public_key_of(public)


def _public_key_of(public: pkcs11.PublicKey) -> SignerPublicKey:
    if public.key_type == pkcs11.KeyType.RSA:
        modulus = int.from_bytes(public[Attribute.MODULUS], "big")
        exponent = int.from_bytes(public[Attribute.PUBLIC_EXPONENT], "big")
        return rsa.RSAPublicNumbers(exponent, modulus).public_key()
    if public.key_type == pkcs11.KeyType.EC:
        params = bytes(public[Attribute.EC_PARAMS])
        for oid, size, curve in _CURVES.values():
            if params == encode_named_curve_parameters(oid):
                return ec.EllipticCurvePublicKey.from_encoded_point(curve, _ec_point(public, size))
    raise KeyUnavailable("token key is not ECDSA P-256/P-384 or RSA")


def _ec_point(public: pkcs11.PublicKey, size: int) -> bytes:
    """The uncompressed point; tokens give it raw or (as the standard says) in a DER OCTET STRING."""
    point = bytes(public[Attribute.EC_POINT])
    if len(point) == 2 * size + 1:
        return point
    if len(point) == 2 * size + 3 and point[0] == 0x04 and point[1] == 2 * size + 1:
        return point[2:]
    raise KeyUnavailable("the PKCS#11 token returned an EC point in an unknown encoding")
