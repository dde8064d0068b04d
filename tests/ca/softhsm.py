"""SoftHSM2 for tests: one private configuration and token directory per test process.

SoftHSM reads ``SOFTHSM2_CONF`` when the PKCS#11 library is initialized, and only then looks for
tokens, so the configuration is created once per process (before any test loads the library)
and, after each new token, the library is re-initialized to see it. Re-initializing invalidates
open sessions; ``Pkcs11KeyBackend`` reopens its session when that happens.

Use the ``softhsm_token`` fixture (import it into a test module) or ``SoftHSM.shared().new_token()``.
"""

from __future__ import annotations

import atexit
import os
import secrets
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

MODULE_CANDIDATES = (
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/local/lib/softhsm/libsofthsm2.so",
)
SOFTHSM_UTIL = shutil.which("softhsm2-util")


def softhsm_module() -> str | None:
    return next((path for path in MODULE_CANDIDATES if Path(path).exists()), None)


def softhsm_available() -> bool:
    return SOFTHSM_UTIL is not None and softhsm_module() is not None


# never a skip: `make test` installs SoftHSM2 (scripts/sysdeps.sh); without it SoftHSM() fails loudly
requires_softhsm = pytest.mark.softhsm


@dataclass(frozen=True)
class SoftHSMToken:
    module_path: str
    label: str
    pin: str = field(repr=False)
    so_pin: str = field(repr=False)


class SoftHSM:
    """The process's SoftHSM configuration; tokens are added with ``new_token``."""

    _instance: SoftHSM | None = None
    _lock = threading.Lock()

    def __init__(self) -> None:
        module = softhsm_module()
        if module is None or SOFTHSM_UTIL is None:
            raise RuntimeError("SoftHSM2 is not installed: run `make sysdeps` (apt-get install softhsm2)")
        self.module_path = module
        self.directory = Path(tempfile.mkdtemp(prefix="meshbridge-softhsm-"))
        (self.directory / "tokens").mkdir()
        self.conf = self.directory / "softhsm2.conf"
        self.conf.write_text(
            f"directories.tokendir = {self.directory / 'tokens'}\n"
            "objectstore.backend = file\n"
            "log.level = ERROR\n"
            "slots.removable = false\n"
        )
        os.environ["SOFTHSM2_CONF"] = str(self.conf)
        atexit.register(shutil.rmtree, self.directory, ignore_errors=True)

    @classmethod
    def shared(cls) -> SoftHSM:
        with cls._lock:
            if cls._instance is None:
                cls._instance = cls()
            return cls._instance

    def new_token(self, label: str | None = None, *, pin: str | None = None) -> SoftHSMToken:
        """Initialize a fresh token and make the already-loaded library see it."""
        token = SoftHSMToken(
            module_path=self.module_path,
            label=label or f"test-{secrets.token_hex(4)}",
            pin=pin or secrets.token_hex(8),
            so_pin=secrets.token_hex(8),
        )
        assert SOFTHSM_UTIL is not None
        init = [
            "--init-token",
            "--free",
            "--label",
            token.label,
            "--pin",
            token.pin,
            "--so-pin",
            token.so_pin,
        ]
        subprocess.run(
            [SOFTHSM_UTIL, *init],
            env={**os.environ, "SOFTHSM2_CONF": str(self.conf)},
            check=True,
            capture_output=True,
            timeout=60,
        )
        import pkcs11

        pkcs11.lib(self.module_path).reinitialize()  # loads it the first time; rescans tokens after
        return token


@pytest.fixture(scope="module")
def softhsm_token() -> Iterator[SoftHSMToken]:
    """A fresh SoftHSM2 token for one test module."""
    if not softhsm_available():
        pytest.skip("needs SoftHSM2 (apt-get install softhsm2)")
    yield SoftHSM.shared().new_token()
