"""Stable virtual IPs for imported names, and the ConfigMap that carries them across restarts.

Plain TCP clients and DNS need one distinct address per imported service (ISTIO-NOTES,
"Cross-cluster routing"): the address goes into `ServiceEntry.addresses` and the CoreDNS block.
An address must never move while a name is imported, or clients holding the old answer break, so
the previous allocation (persisted by the caller in ConfigMap `meshbridge-state` or the state
directory) is always honoured first. New names get a deterministic address: a hash of the name
into the range, probing forward on collision, so two agents rendering the same input agree.

When `dns.vip_range` changes (the default moved from 240.240.0.0/16, Istio's own auto-allocation
range, to 241.0.0.0/16), a previous address outside the new range cannot be kept; the name keeps
its host part instead where that address is free (240.240.A.B → 241.0.A.B between two /16s), so
the renumbering is predictable, and only then falls back to the hash.
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Iterable, Mapping
from typing import Any

from cluster_agent.render.errors import VipRangeExhausted
from cluster_agent.render.objects import Manifest, managed_labels, metadata

__all__ = ["STATE_CONFIGMAP", "VIPS_KEY", "allocate_vips", "render_state_configmap", "vips_from_state"]

STATE_CONFIGMAP = "meshbridge-state"
VIPS_KEY = "vips"


def _usable(network: ipaddress.IPv4Network) -> tuple[int, int]:
    """First usable address as an int and the number of usable addresses (no network/broadcast)."""
    if network.prefixlen > 30:
        raise VipRangeExhausted(f"vip_range {network} has no usable addresses; use /30 or shorter")
    return int(network.network_address) + 1, network.num_addresses - 2


def allocate_vips(
    names: Iterable[str],
    *,
    vip_range: ipaddress.IPv4Network | str,
    previous: Mapping[str, str],
) -> dict[str, str]:
    """Give each wanted name an address in `vip_range`, keeping every previous assignment that is
    still wanted and still valid (inside the range, not its network or broadcast address, not
    claimed twice). Returns the allocation for exactly the wanted names.
    """
    network = ipaddress.IPv4Network(vip_range) if isinstance(vip_range, str) else vip_range
    first, count = _usable(network)
    wanted = sorted(set(names))
    if len(wanted) > count:
        raise VipRangeExhausted(
            f"dns.vip_range {network} has {count} usable addresses for {len(wanted)} imported names; "
            f"choose a larger range"
        )
    taken: dict[int, str] = {}
    result: dict[str, str] = {}
    kept = _previous_addresses(previous, set(wanted))
    moved: dict[str, int] = {}
    for name, address in kept.items():
        if first <= address < first + count and address not in taken:
            taken[address] = name
            result[name] = str(ipaddress.IPv4Address(address))
        elif address not in range(first, first + count):
            moved[name] = int(network.network_address) | (address & int(network.hostmask))
    for name, address in moved.items():
        if first <= address < first + count and address not in taken:
            taken[address] = name
            result[name] = str(ipaddress.IPv4Address(address))
    for name in wanted:
        if name in result:
            continue
        offset = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big") % count
        while first + offset in taken:
            offset = (offset + 1) % count
        taken[first + offset] = name
        result[name] = str(ipaddress.IPv4Address(first + offset))
    return {name: result[name] for name in wanted}


def _previous_addresses(previous: Mapping[str, str], wanted: set[str]) -> dict[str, int]:
    """The previous addresses of the wanted names, by name in sorted order; unreadable ones left out."""
    addresses: dict[str, int] = {}
    for name in sorted(previous):
        if name not in wanted:
            continue
        try:
            addresses[name] = int(ipaddress.IPv4Address(previous[name]))
        except ValueError:
            continue
    return addresses


def render_state_configmap(vips: Mapping[str, str], *, namespace: str, cluster: str) -> Manifest:
    """ConfigMap `meshbridge-state`: one `<name> <address>` line per imported name, sorted."""
    lines = "".join(f"{name} {vips[name]}\n" for name in sorted(vips))
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": metadata(STATE_CONFIGMAP, namespace, managed_labels(cluster, "state")),
        "data": {VIPS_KEY: lines},
    }


def vips_from_state(configmap_or_data: Mapping[str, Any] | None) -> dict[str, str]:
    """Read the allocation back from the ConfigMap (or its `data`); unreadable lines are skipped,
    which only costs those names a fresh address."""
    if not configmap_or_data:
        return {}
    data = configmap_or_data.get("data", configmap_or_data)
    text = data.get(VIPS_KEY) if isinstance(data, Mapping) else None
    if not isinstance(text, str):
        return {}
    vips: dict[str, str] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2:
            vips[parts[0]] = parts[1]
    return vips
