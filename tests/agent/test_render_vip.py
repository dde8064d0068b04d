"""Stable VIP allocation and the state ConfigMap that carries it across restarts."""

from __future__ import annotations

import ipaddress
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cluster_agent.config import DEFAULT_VIP_RANGE, ISTIO_AUTO_ALLOCATE_RANGE
from cluster_agent.render import VipRangeExhausted, allocate_vips, render_state_configmap, vips_from_state

RANGE = ipaddress.IPv4Network("240.240.0.0/16")  # the allocator takes any range; config refuses this one


def names(n: int) -> list[str]:
    return [f"svc{i}.ns{i % 7}" for i in range(n)]


def test_same_names_same_addresses_whatever_the_order() -> None:
    wanted = names(200)
    first = allocate_vips(wanted, vip_range=RANGE, previous={})
    shuffled = wanted[:]
    random.Random(4).shuffle(shuffled)
    assert allocate_vips(shuffled, vip_range=RANGE, previous={}) == first
    assert allocate_vips(wanted, vip_range="240.240.0.0/16", previous={}) == first
    assert len(set(first.values())) == 200
    assert all(ipaddress.IPv4Address(a) in RANGE for a in first.values())


def test_previous_assignments_are_kept_and_new_names_do_not_move_them() -> None:
    previous = {"ratings.bookinfo": "240.240.0.9", "reviews.bookinfo": "240.240.7.7"}
    result = allocate_vips(["ratings.bookinfo", "reviews.bookinfo", *names(500)], vip_range=RANGE, previous=previous)
    assert result["ratings.bookinfo"] == "240.240.0.9"
    assert result["reviews.bookinfo"] == "240.240.7.7"
    assert len(set(result.values())) == 502


def test_names_no_longer_wanted_are_dropped() -> None:
    previous = allocate_vips(names(10), vip_range=RANGE, previous={})
    result = allocate_vips(names(5), vip_range=RANGE, previous=previous)
    assert result == {k: previous[k] for k in names(5)}


def test_adding_and_removing_names_never_moves_the_others() -> None:
    alloc = allocate_vips(names(50), vip_range=RANGE, previous={})
    for step in range(20):
        wanted = [*names(50)[step:], f"new{step}.ns"]
        nxt = allocate_vips(wanted, vip_range=RANGE, previous=alloc)
        for name in wanted:
            if name in alloc:
                assert nxt[name] == alloc[name]
        alloc = nxt


def test_network_and_broadcast_are_never_handed_out() -> None:
    network = ipaddress.IPv4Network("240.240.0.0/30")  # .0 network, .3 broadcast
    result = allocate_vips(["a.x", "b.x"], vip_range=network, previous={})
    assert sorted(result.values()) == ["240.240.0.1", "240.240.0.2"]
    small = ipaddress.IPv4Network("240.240.0.0/29")
    full = allocate_vips(names(6), vip_range=small, previous={})
    assert sorted(full.values()) == [f"240.240.0.{i}" for i in range(1, 7)]


def test_too_many_names_for_the_range() -> None:
    with pytest.raises(VipRangeExhausted, match=r"240.240.0.0/30 has 2 usable addresses for 3 imported names"):
        allocate_vips(["a.x", "b.x", "c.x"], vip_range=ipaddress.IPv4Network("240.240.0.0/30"), previous={})


@pytest.mark.parametrize(
    "bad",
    ["240.241.0.1", "240.240.0.0", "240.240.255.255", "not-an-ip", "::1", ""],
)
def test_invalid_previous_entries_are_reassigned_inside_the_range(bad: str) -> None:
    result = allocate_vips(["a.x"], vip_range=RANGE, previous={"a.x": bad})
    address = ipaddress.IPv4Address(result["a.x"])
    assert address in RANGE and address not in (RANGE.network_address, RANGE.broadcast_address)
    assert result["a.x"] != bad


def test_an_address_claimed_twice_goes_to_one_name_only() -> None:
    result = allocate_vips(["a.x", "b.x"], vip_range=RANGE, previous={"a.x": "240.240.1.1", "b.x": "240.240.1.1"})
    assert result["a.x"] == "240.240.1.1"
    assert result["b.x"] != "240.240.1.1"


def test_a_changed_range_moves_only_addresses_outside_it() -> None:
    previous = {"a.x": "240.240.0.5", "b.x": "240.241.0.5"}
    result = allocate_vips(["a.x", "b.x"], vip_range=ipaddress.IPv4Network("240.240.0.0/16"), previous=previous)
    assert result["a.x"] == "240.240.0.5"
    assert ipaddress.IPv4Address(result["b.x"]) in RANGE


def test_collisions_probe_to_free_addresses() -> None:
    network = ipaddress.IPv4Network("240.240.0.0/24")
    result = allocate_vips(names(254), vip_range=network, previous={})
    assert len(set(result.values())) == 254


def test_state_configmap_round_trip() -> None:
    alloc = allocate_vips(names(30), vip_range=RANGE, previous={})
    cm = render_state_configmap(alloc, namespace="istio-system", cluster="b")
    assert cm["metadata"]["name"] == "meshbridge-state"
    assert cm["metadata"]["namespace"] == "istio-system"
    assert cm["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "meshbridge"
    lines = cm["data"]["vips"].splitlines()
    assert lines == sorted(lines) and len(lines) == 30
    assert vips_from_state(cm) == alloc
    assert vips_from_state(cm["data"]) == alloc
    assert vips_from_state(None) == {}
    assert vips_from_state({"data": {"vips": "garbage\nok.x 240.240.0.1\n"}}) == {"ok.x": "240.240.0.1"}
    # A restart that reads the ConfigMap back keeps every address.
    assert allocate_vips(names(30), vip_range=RANGE, previous=vips_from_state(cm)) == alloc


@settings(max_examples=60, deadline=None)
@given(
    before=st.sets(st.from_regex(r"[a-z]{1,6}\.[a-z]{1,4}", fullmatch=True), max_size=40),
    after=st.sets(st.from_regex(r"[a-z]{1,6}\.[a-z]{1,4}", fullmatch=True), max_size=40),
)
def test_stability_property(before: set[str], after: set[str]) -> None:
    network = ipaddress.IPv4Network("240.240.0.0/25")
    first = allocate_vips(before, vip_range=network, previous={})
    second = allocate_vips(after, vip_range=network, previous=first)
    assert set(second) == after
    assert len(set(second.values())) == len(after)
    for name in before & after:
        assert second[name] == first[name]
    for address in second.values():
        ip = ipaddress.IPv4Address(address)
        assert ip in network and ip not in (network.network_address, network.broadcast_address)


def test_the_default_range_moves_off_istios_and_keeps_each_names_host_part() -> None:
    """Upgrade from the old default 240.240.0.0/16: every name moves once, to the same host part in
    241.0.0.0/16, and stays there."""
    assert not DEFAULT_VIP_RANGE.overlaps(ISTIO_AUTO_ALLOCATE_RANGE)
    # addresses kept from earlier allocations, not where the hash would put them today
    old = {name: f"240.240.{i}.{i + 1}" for i, name in enumerate(names(250))}
    assert allocate_vips(names(250), vip_range=RANGE, previous=old) == old
    new = allocate_vips(names(250), vip_range=DEFAULT_VIP_RANGE, previous=old)
    for name, address in old.items():
        assert new[name] == address.replace("240.240.", "241.0.", 1), name
    assert allocate_vips(names(250), vip_range=DEFAULT_VIP_RANGE, previous=new) == new


def test_a_moved_name_whose_host_part_is_taken_or_unusable_gets_a_hashed_address() -> None:
    previous = {"a.x": "241.0.0.5", "b.x": "240.240.0.5", "c.x": "240.240.255.255", "d.x": "240.240.0.0"}
    result = allocate_vips(["a.x", "b.x", "c.x", "d.x"], vip_range=DEFAULT_VIP_RANGE, previous=previous)
    assert result["a.x"] == "241.0.0.5"  # kept: already in the range
    assert len(set(result.values())) == 4
    for name in ("b.x", "c.x", "d.x"):
        address = ipaddress.IPv4Address(result[name])
        assert address in DEFAULT_VIP_RANGE and address not in (
            DEFAULT_VIP_RANGE.network_address,
            DEFAULT_VIP_RANGE.broadcast_address,
        )
    assert result == allocate_vips(["d.x", "c.x", "b.x", "a.x"], vip_range=DEFAULT_VIP_RANGE, previous=previous)


def test_a_smaller_new_range_keeps_the_host_bits_it_has() -> None:
    result = allocate_vips(["a.x"], vip_range="241.0.7.0/24", previous={"a.x": "240.240.3.9"})
    assert result["a.x"] == "241.0.7.9"
