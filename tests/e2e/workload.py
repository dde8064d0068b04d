"""Workload certificates minted from a cluster's `cacerts` the way istiod signs them (SPIFFE URI
SAN, EKU serverAuth+clientAuth, `cert-chain.pem` appended), and mTLS handshakes between them under
BoringSSL (grpcio) and OpenSSL (Python's ssl)."""

from __future__ import annotations

import datetime as dt
import socket
import ssl
import tempfile
import threading
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from tests.support.pgserver import free_port


@dataclass
class Workload:
    key_pem: bytes
    chain_pem: bytes  # leaf + cert-chain.pem
    uri: str

    def files(self, d: Path, name: str) -> tuple[Path, Path]:
        k, c = d / f"{name}.key", d / f"{name}.crt"
        k.write_bytes(self.key_pem)
        c.write_bytes(self.chain_pem)
        return k, c


def mint(cacerts: dict[str, str], uri: str, *, dns: str | None = None) -> Workload:
    """Sign like istiod's CA: issuer = ca-cert.pem with ca-key.pem; chain = leaf + cert-chain.pem."""
    ca_cert = x509.load_pem_x509_certificate(cacerts["ca-cert.pem"].encode())
    ca_key = serialization.load_pem_private_key(cacerts["ca-key.pem"].encode(), password=None)
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(uri)]
    if dns:
        sans.append(x509.DNSName(dns))
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_encipherment=True,
                content_commitment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
        .add_extension(x509.SubjectAlternativeName(sans), critical=True)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()),  # type: ignore[arg-type]
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return Workload(key_pem, cert.public_bytes(serialization.Encoding.PEM) + cacerts["cert-chain.pem"].encode(), uri)


# ----------------------------------------------------------------------------- BoringSSL (grpcio)
def _echo_handler() -> grpc.GenericRpcHandler:
    def echo(request: bytes, context: grpc.ServicerContext) -> bytes:
        return request

    return grpc.method_handlers_generic_handler("meshbridge.Echo", {"Call": grpc.unary_unary_rpc_method_handler(echo)})


def grpc_handshake(
    *, server: Workload, client: Workload, server_roots: str, client_roots: str, sni: str = "ratings.bookinfo.remote"
) -> tuple[bool, str]:
    """mTLS under BoringSSL: returns (ok, detail)."""
    port = free_port()
    srv = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    srv.add_generic_rpc_handlers((_echo_handler(),))
    creds = grpc.ssl_server_credentials(
        [(server.key_pem, server.chain_pem)], root_certificates=server_roots.encode(), require_client_auth=True
    )
    srv.add_secure_port(f"127.0.0.1:{port}", creds)
    srv.start()
    try:
        ccreds = grpc.ssl_channel_credentials(
            root_certificates=client_roots.encode(), private_key=client.key_pem, certificate_chain=client.chain_pem
        )
        with grpc.secure_channel(f"127.0.0.1:{port}", ccreds, options=[("grpc.ssl_target_name_override", sni)]) as ch:
            call = ch.unary_unary("/meshbridge.Echo/Call", request_serializer=None, response_deserializer=None)
            try:
                out = call(b"ping", timeout=5)
                return out == b"ping", "ok"
            except grpc.RpcError as exc:
                return False, f"{exc.code()}: {exc.details()}"
    finally:
        srv.stop(0)


# ----------------------------------------------------------------------------- OpenSSL (ssl module)
def openssl_handshake(
    *, server: Workload, client: Workload, server_roots: str, client_roots: str, server_crls: str | None = None
) -> tuple[bool, str]:
    """mTLS under OpenSSL; with ``server_crls`` the server checks the whole client chain against them."""
    with tempfile.TemporaryDirectory() as d:
        dd = Path(d)
        sk, sc = server.files(dd, "server")
        ck, cc = client.files(dd, "client")
        sctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        sctx.load_cert_chain(sc, sk)
        sctx.verify_mode = ssl.CERT_REQUIRED
        sctx.load_verify_locations(cadata=server_roots)
        if server_crls:  # a PEM file may hold CRLs (X509_load_cert_crl_file); cadata may not
            (dd / "crls.pem").write_text(server_crls)
            sctx.load_verify_locations(cafile=str(dd / "crls.pem"))
            sctx.verify_flags |= ssl.VERIFY_CRL_CHECK_CHAIN
        cctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        cctx.check_hostname = False  # Istio matches the URI SAN, not a host name
        cctx.load_verify_locations(cadata=client_roots)
        cctx.load_cert_chain(cc, ck)
        lsock = socket.socket()
        lsock.bind(("127.0.0.1", 0))
        lsock.listen(1)
        port = lsock.getsockname()[1]
        result: dict[str, str] = {}

        def serve() -> None:
            conn, _ = lsock.accept()
            try:
                with sctx.wrap_socket(conn, server_side=True) as tls:
                    tls.sendall(b"ok")
                    result["server"] = "ok"
            except (ssl.SSLError, OSError) as exc:
                result["server"] = f"server: {exc}"

        t = threading.Thread(target=serve, daemon=True)
        t.start()
        try:
            with (
                socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
                cctx.wrap_socket(raw, server_hostname="ratings.bookinfo.remote") as tls,
            ):
                data = tls.recv(2)
            t.join(5)
            ok = data == b"ok" and result.get("server") == "ok"
            return ok, result.get("server", "no server result")
        except (ssl.SSLError, OSError) as exc:
            t.join(5)
            return False, f"client: {exc}; {result.get('server', '')}"
        finally:
            lsock.close()
