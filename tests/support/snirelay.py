"""A TCP relay that routes a TLS connection by the SNI of its ClientHello without opening it: what
an Istio gateway's PASSTHROUGH server does (a filter chain per SNI, then a TCP proxy). Connections
whose SNI is not in `routes` are closed, as Envoy closes a connection no filter chain matches."""

from __future__ import annotations

import socket
import struct
import threading
from collections.abc import Mapping

__all__ = ["SniRelay", "client_hello_sni"]


def client_hello_sni(record: bytes) -> str | None:
    """The host name of the server_name extension of a TLS ClientHello record (RFC 8446 4.1.2,
    RFC 6066 3), or None."""
    try:
        if record[0] != 0x16 or record[5] != 0x01:  # handshake record, ClientHello
            return None
        pos = 5 + 4 + 2 + 32  # record header, handshake header, legacy_version, random
        pos += 1 + record[pos]  # session id
        (n,) = struct.unpack_from("!H", record, pos)
        pos += 2 + n  # cipher suites
        pos += 1 + record[pos]  # compression methods
        (total,) = struct.unpack_from("!H", record, pos)
        pos += 2
        end = pos + total
        while pos + 4 <= end:
            kind, size = struct.unpack_from("!HH", record, pos)
            pos += 4
            if kind == 0:  # server_name: list length, name type (0 = host_name), name length, name
                (length,) = struct.unpack_from("!H", record, pos + 3)
                return record[pos + 5 : pos + 5 + length].decode("ascii")
            pos += size
    except (IndexError, struct.error, UnicodeDecodeError):
        return None
    return None


class SniRelay:
    """Listens on 127.0.0.1; forwards each connection whose SNI is in `routes` to routes[sni]
    (a loopback port), bytes untouched. `seen` records (sni, forwarded)."""

    def __init__(self, routes: Mapping[str, int]) -> None:
        self.routes = dict(routes)
        self.seen: list[tuple[str | None, bool]] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._listener.getsockname()[1])
        threading.Thread(target=self._serve, daemon=True).start()

    def close(self) -> None:
        self._listener.close()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._relay, args=(conn,), daemon=True).start()

    def _relay(self, conn: socket.socket) -> None:
        with conn:
            first = conn.recv(16384)
            sni = client_hello_sni(first)
            target = self.routes.get(sni or "")
            self.seen.append((sni, target is not None))
            if target is None:
                return
            with socket.create_connection(("127.0.0.1", target)) as upstream:
                upstream.sendall(first)
                pump = threading.Thread(target=_pump, args=(upstream, conn), daemon=True)
                pump.start()
                _pump(conn, upstream)
                pump.join(5)


def _pump(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(16384):
            dst.sendall(data)
    except OSError:
        pass
    finally:
        try:
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass
