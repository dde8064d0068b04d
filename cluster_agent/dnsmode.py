"""`dns.mode: istio`: what the mesh must have switched on for sidecars to answer imported names.

In this mode the agent writes no DNS objects. Each imported name's ServiceEntry carries its VIP in
`addresses`, and Istio's DNS proxy in every sidecar answers it, read in Istio's source:

- istiod builds each proxy's name table from the services its SidecarScope sees
  (`pkg/dns/server/name_table.go` `BuildNameTable`: `SidecarScope.EgressListeners` →
  `Services()`), so a ServiceEntry answers where its `exportTo` (meshbridge writes `*`) and any
  `Sidecar` egress `hosts` let the proxy see it. The addresses are the ServiceEntry's own
  (`GetAllAddressesForProxy`, pilot/pkg/model/service.go), whatever its resolution (STATIC or
  DNS); only Istio's auto-allocated addresses, for ServiceEntries without any, depend on
  `ISTIO_META_DNS_AUTO_ALLOCATE` or `PILOT_ENABLE_IP_AUTOALLOCATE` (`nodeUsesAutoallocatedIPs`),
  which meshbridge's ServiceEntries therefore do not need.
- The sidecar's agent answers a known name itself, authoritatively, NOERROR with no data for a
  type it has no records of (`pkg/dns/client/dns.go` `LocalDNSServer.ServeDNS`,
  `LookupTable.lookupHost`). A name it does not know — including a name under the suffix that
  is not imported — goes upstream to the pod's resolv.conf servers unchanged (`ServeDNS` →
  `upstream` → `queryUpstream`): the cluster DNS, which forwards it on to the node's or the
  cloud's resolvers, where it ends as NXDOMAIN from the root (or whatever those resolvers say for
  the suffix). So in this mode a mistyped `<name>.<suffix>` leaves the cluster; pick a suffix no
  upstream resolver serves (the default `remote` is not a delegated top-level domain).
- The proxy only sees the pod's DNS traffic when capture is on: `ISTIO_META_DNS_CAPTURE=true` in
  the sidecar's environment. The injector copies `ProxyConfig.proxyMetadata` into the env of
  istio-init and istio-proxy (manifests/charts/istio-control/istio-discovery/files/
  injection-template.yaml); istio-init then redirects port 53 to the agent
  (tools/istio-iptables/pkg/cmd/root.go binds `RedirectDNS` to the variable; with istio-cni,
  cni/pkg/plugin/sidecar_redirect.go reads it from the proxy's env). That ProxyConfig is
  `meshConfig.defaultConfig` merged with the pod annotation `proxy.istio.io/config`
  (pkg/kube/inject/inject.go). pilot-agent parses the value with Go's `strconv.ParseBool`
  (pkg/env/var.go) and falls back to false on anything else.

`dns_capture_problem` checks the mesh-wide setting in a parsed meshConfig (the `mesh` key of the
`istio` ConfigMap). Pods can still turn capture on or off one by one with the annotation, which
this cannot see.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["DNS_CAPTURE", "dns_capture_problem"]

DNS_CAPTURE = "ISTIO_META_DNS_CAPTURE"
# Go's strconv.ParseBool: the spellings pilot-agent reads as true / false.
_TRUE = frozenset({"1", "t", "T", "TRUE", "true", "True"})
_FALSE = frozenset({"0", "f", "F", "FALSE", "false", "False"})
_FIX = (
    f'set meshConfig.defaultConfig.proxyMetadata.{DNS_CAPTURE}: "true" (or the pod annotation '
    f'proxy.istio.io/config: \'{{"proxyMetadata": {{"{DNS_CAPTURE}": "true"}}}}\') and restart the '
    f"workloads, or use dns.mode coredns"
)


def dns_capture_problem(mesh_config: Mapping[str, Any]) -> str | None:
    """What keeps sidecars from answering imported names, given a parsed meshConfig; None when
    `defaultConfig.proxyMetadata` turns DNS capture on for every injected pod."""
    default_config = mesh_config.get("defaultConfig")
    if default_config is None:
        return f"meshConfig has no defaultConfig, so Istio's DNS capture is off: {_FIX}"
    if not isinstance(default_config, Mapping):
        return f"meshConfig.defaultConfig is not a mapping, so Istio's DNS capture cannot be on: {_FIX}"
    metadata = default_config.get("proxyMetadata")
    if metadata is None:
        return f"meshConfig.defaultConfig.proxyMetadata is not set, so Istio's DNS capture is off: {_FIX}"
    if not isinstance(metadata, Mapping):
        return f"meshConfig.defaultConfig.proxyMetadata is not a mapping of strings: {_FIX}"
    if DNS_CAPTURE not in metadata:
        return f"meshConfig.defaultConfig.proxyMetadata has no {DNS_CAPTURE}, so Istio's DNS capture is off: {_FIX}"
    value = metadata[DNS_CAPTURE]
    if not isinstance(value, str):
        # ProxyConfig.proxy_metadata is map<string, string>: an unquoted YAML true is not a string
        return (
            f"meshConfig.defaultConfig.proxyMetadata.{DNS_CAPTURE} is {value!r}, not a string; "
            f'proxyMetadata values are strings, so quote it: {DNS_CAPTURE}: "true"'
        )
    if value in _TRUE:
        return None
    state = "turns DNS capture off" if value in _FALSE else "is not a boolean, which pilot-agent reads as false"
    return f"meshConfig.defaultConfig.proxyMetadata.{DNS_CAPTURE} is {value!r}, which {state}: {_FIX}"


def dns_check_for(mode: str) -> Callable[[Mapping[str, Any]], str | None] | None:
    """The meshConfig check the agent runs each pass for ``dns.mode`` (meshcheck's `dns_check`):
    only `istio` relies on the sidecars' DNS proxy."""
    return dns_capture_problem if mode == "istio" else None
