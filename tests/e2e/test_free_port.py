"""The e2e suite's listening ports come from below the kernel's ephemeral range, where no outgoing
connection's source port can take them between choosing and binding (or across a restart)."""

from __future__ import annotations

import random
import socket

import pytest

from tests.e2e.clusters import ephemeral_low, free_port


def test_ports_are_below_the_ephemeral_range_and_free() -> None:
    low = ephemeral_low()
    assert low > 2048  # Linux: /proc/sys/net/ipv4/ip_local_port_range (32768 by default)
    ports = [free_port() for _ in range(50)]
    assert all(1024 <= p < low for p in ports), ports
    assert len(set(ports)) > 40  # chosen at random, not one port handed out again and again
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", ports[-1]))  # free when handed out


def test_a_port_is_never_handed_out_twice(monkeypatch: pytest.MonkeyPatch) -> None:
    """istiod's five ports are chosen before any is bound, and a port is free while its istiod
    restarts: the random pick must not hand it to another listener (a CI run's istiod bed failed
    with "bind: address already in use"). Fails before the handed-out ports were remembered: the
    second call returned the first port again."""
    low = ephemeral_low()
    first = free_port()
    picks = iter([first, first, first - 1 if first - 1 >= max(1024, low - 12000) else first + 1])
    monkeypatch.setattr(random, "randrange", lambda *_: next(picks))
    second = free_port()
    assert second != first
    assert second in (first - 1, first + 1)
