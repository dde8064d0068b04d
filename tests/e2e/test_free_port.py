"""The e2e suite's listening ports come from below the kernel's ephemeral range, where no outgoing
connection's source port can take them between choosing and binding (or across a restart)."""

from __future__ import annotations

import socket

from tests.e2e.clusters import ephemeral_low, free_port


def test_ports_are_below_the_ephemeral_range_and_free() -> None:
    low = ephemeral_low()
    assert low > 2048  # Linux: /proc/sys/net/ipv4/ip_local_port_range (32768 by default)
    ports = [free_port() for _ in range(50)]
    assert all(1024 <= p < low for p in ports), ports
    assert len(set(ports)) > 40  # chosen at random, not one port handed out again and again
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", ports[-1]))  # free when handed out
