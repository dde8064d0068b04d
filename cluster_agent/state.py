"""What the agent keeps between runs: its agent token, the current intermediate key and bundle,
the VIP assignments, its own CRL, the final CRLs of superseded intermediates and the roots' CRLs.
In render mode a 0700 directory of 0600 files; in a cluster a Secret (see kube.SecretStateStore).
No repr shows a secret."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol


@dataclass
class AgentState:
    agent_token: str | None = None
    key_pem: str | None = None  # the current intermediate's key (also in cacerts' ca-key.pem)
    bundle: dict[str, str] = field(default_factory=dict)  # ca-cert.pem, cert-chain.pem, root-cert.pem, crl.pem
    generation: int = 0
    serial: str = ""
    vips: dict[str, str] = field(default_factory=dict)
    own_crl_pem: str = ""
    own_crl_signed_at: str = ""
    # the final CRL of each superseded intermediate, kept in ca-crl.pem until no workload certificate
    # under it can be alive: [{"serial": hex, "crl_pem": PEM, "keep_until": ISO 8601}]
    superseded_crls: list[dict[str, str]] = field(default_factory=list)
    root_crls_pem: str = ""  # the roots' CRLs as last received (desired state's crl), for passes without the CA
    trust_bundle: str = ""  # the CA's trust bundle as last accepted (root-cert.pem of cacerts)
    trusted_roots: str = ""  # PEM: the roots this agent trusts (see trust.py); the CA client's TLS trust
    trusted_anchor_sha256: str = ""  # of the ca.trust_anchor file the set was last seeded from

    def __repr__(self) -> str:
        return (
            f"AgentState(enrolled={self.agent_token is not None}, generation={self.generation}, "
            f"serial={self.serial!r}, vips={len(self.vips)})"
        )

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, indent=1)

    @classmethod
    def from_json(cls, text: str) -> AgentState:
        raw: dict[str, Any] = json.loads(text)
        return cls(**{k: v for k, v in raw.items() if k in cls.__dataclass_fields__})


class StateStore(Protocol):
    def load(self) -> AgentState: ...
    def save(self, state: AgentState) -> None: ...


class DirStateStore:
    """``<dir>/state.json`` (0600) in a 0700 directory."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory

    def __repr__(self) -> str:
        return f"DirStateStore({str(self.dir)!r})"

    def load(self) -> AgentState:
        path = self.dir / "state.json"
        if not path.exists():
            return AgentState()
        return AgentState.from_json(path.read_text())

    def save(self, state: AgentState) -> None:
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.dir, 0o700)
        tmp = self.dir / f".state.json.{os.getpid()}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, state.to_json().encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.dir / "state.json")
