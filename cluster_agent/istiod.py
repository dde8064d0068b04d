"""Reads what istiod serves in a live cluster (see served.py): two ConfigMaps through the API
server, and istiod's serving certificate from a TLS handshake with its secure gRPC port.

The handshake verifies nothing and sends nothing: the certificate is only compared with the
intermediates this agent installed, and reported.
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Callable, Mapping

from cluster_agent.errors import KubeError
from cluster_agent.served import IstiodOutputs

__all__ = ["LiveIstiodView", "serving_certificate"]

ROOT_CERT_CONFIGMAP = ("istio-ca-root-cert", "root-cert.pem")
CRL_CONFIGMAP = ("istio-ca-crl", "ca-crl.pem")


def serving_certificate(host: str, port: int, *, server_name: str, timeout: float) -> bytes:
    """The DER certificate istiod presents on ``host:port`` for ``server_name``."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # observed and compared, never trusted
    ctx.set_alpn_protocols(["h2"])
    with (
        socket.create_connection((host, port), timeout=timeout) as raw,
        ctx.wrap_socket(raw, server_hostname=server_name) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    if not der:
        raise ssl.SSLError("istiod presented no certificate")
    return der


class LiveIstiodView:
    def __init__(
        self,
        configmap_data: Callable[[str, str], Mapping[str, str] | None],
        *,
        namespace: str,
        address: tuple[str, int],
        timeout: float = 3.0,
    ) -> None:
        self.configmap_data = configmap_data
        self.namespace = namespace
        self.address = address
        self.timeout = timeout

    def read(self) -> IstiodOutputs:
        problems: list[str] = []
        bundle = self._configmap_key(*ROOT_CERT_CONFIGMAP, problems)
        crls = self._configmap_key(*CRL_CONFIGMAP, problems)
        host, port = self.address
        try:
            serving: bytes | None = serving_certificate(
                host, port, server_name=f"istiod.{self.namespace}.svc", timeout=self.timeout
            )
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            problems.append(f"istiod at {host}:{port} did not present its certificate: {exc}")
            serving = None
        return IstiodOutputs(bundle_pem=bundle, crl_pem=crls, serving_cert_der=serving, problems=problems)

    def _configmap_key(self, name: str, key: str, problems: list[str]) -> str | None:
        try:
            data = self.configmap_data(self.namespace, name)
        except KubeError as exc:
            problems.append(f"reading ConfigMap {self.namespace}/{name}: {exc}")
            return None
        if data is None or not data.get(key):
            problems.append(f"ConfigMap {self.namespace}/{name} has no {key}: istiod has not published it")
            return None
        return data[key]
