"""Playing the agent's `served` report (what its istiod serves) in tests that have no istiod.

The report is built from what the CA issued and the agent installed: the trust bundle of its
`cacerts` and the intermediate in `ca-cert.pem`, as an agent watching an istiod that loaded them
would report it (tests/e2e/test_istiod_bed.py observes a real istiod instead). Fingerprints are
computed here, independently of the CA's code.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from ca_server.core.authority import Authority
from meshbridge_wire.models import ServedIn


def rfc3339(dt: datetime) -> str:
    return dt.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def fingerprints(bundle_pem: str) -> list[str]:
    """SHA-256 of each certificate's DER in ``bundle_pem``, lowercase hex."""
    return [
        hashlib.sha256(c.public_bytes(Encoding.DER)).hexdigest()
        for c in x509.load_pem_x509_certificates(bundle_pem.encode())
    ]


def serial_of(cert_pem: str) -> str:
    return format(x509.load_pem_x509_certificate(cert_pem.encode()).serial_number, "x")


def served(
    *,
    bundle: str,
    ca_cert: str | None,
    since: datetime,
    observed_at: datetime | None = None,
    signing_serial: str | None = None,
) -> dict[str, Any]:
    """A validated ``served`` body: istiod serves ``bundle`` and signs with ``ca_cert`` (or the
    intermediate ``signing_serial``) since ``since``, observed at ``observed_at`` (default ``since``)."""
    serial = signing_serial if signing_serial is not None else serial_of(ca_cert) if ca_cert else None
    seen = rfc3339(observed_at or since)
    body = ServedIn(
        observed_at=seen,
        bundle=fingerprints(bundle),
        bundle_since=rfc3339(since),
        signing_serial=serial,
        signing_since=rfc3339(since) if serial else None,
    )
    return body.model_dump()


def report_served(auth: Authority, cluster: str, cacerts: dict[str, str], *, since: datetime | None = None) -> None:
    """Report through ``auth`` (as the agent's `PUT …/status` would) that ``cluster``'s istiod serves
    the `cacerts` files it was given, keeping the rest of the agent's last status."""
    now = auth.ctx.clock()
    c, _ = auth.get_cluster(cluster)
    body = {k: v for k, v in (c.agent_status or {}).items() if k != "received_at"}
    body["served"] = served(
        bundle=cacerts["root-cert.pem"], ca_cert=cacerts["ca-cert.pem"], since=since or now, observed_at=now
    )
    auth.put_status(c, body)
