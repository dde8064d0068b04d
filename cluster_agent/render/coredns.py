"""CoreDNS: the server blocks for the import suffix, merging them into a Corefile, and the stanza
for NodeLocal DNSCache.

Two server blocks for the suffix (`remote:53 { … }`, ISTIO-NOTES "CoreDNS"), never forwarded:

    remote:53 {
        view meshbridge-imported {
            expr name() in ['ratings.bookinfo.remote.']
        }
        errors
        hosts {
            241.0.18.7 ratings.bookinfo.remote
            ttl 30
            no_reverse
        }
    }
    remote:53 {
        errors
        template ANY ANY {
            match ^(?:[^.]+[.])?remote[.]$
            authority "remote. 30 IN SOA ns.dns.remote. hostmaster.remote. 1 7200 1800 86400 30"
            fallthrough
        }
        template ANY ANY {
            rcode NXDOMAIN
            authority "remote. 30 IN SOA ns.dns.remote. hostmaster.remote. 1 7200 1800 86400 30"
        }
    }

Why two, read in CoreDNS's source (v1.15.0):
- `hosts` alone (plugin/hosts/hosts.go `ServeDNS`) answers A for a listed name, NOERROR with no
  data for its other types (`otherRecordsExist`), and SERVFAIL for any name it lacks ("we don't
  have a SOA"), which clients retry; with `fallthrough` it hands that name on, but the plugin
  that could answer NXDOMAIN inline, `template`, runs *before* `hosts` (plugin.cfg orders the
  chain), so it cannot sit behind it in one block.
- Server blocks for one zone and port are tried top to bottom, and a block whose `view` filter is
  false is skipped (core/dnsserver/server.go `ServeDNS`, `passAllFilterFuncs`); a filtered block
  may share its zone with an unfiltered one (core/dnsserver/register.go
  `validateZonesAndListeningAddresses`). `view`'s `name()` is the lowercased query name with its
  final dot (plugin/view, plugin/pkg/expression); expr compiles `in` over a list of string
  constants into a set lookup (expr-lang optimizer/in_array.go). So the first block gets exactly
  the imported names, and the second everything else under the suffix.
- The second block's `template`s (plugin/template/template.go `ServeDNS`: the first template
  whose regex matches answers, with `fallthrough` a non-matching one passes to the next): the
  suffix itself and the namespace level (`bookinfo.remote`, empty non-terminals above imported
  names) answer NOERROR with no data and the SOA, because an NXDOMAIN there would tell a
  resolver that follows RFC 8020 that nothing below exists; any other name answers NXDOMAIN with
  the SOA in the authority section, for every type. The SOA's TTL and minimum are `dns.ttl`, so
  resolvers cache the negative answer that long (RFC 2308).
A view's expression may hold at most 10,000 nodes (expr-lang parser/parser.go,
`conf.DefaultMaxNodes`), so the names are listed 5,000 per block, in as many view blocks as that
takes, before the catch-all; without imported names only the catch-all is written. `view` needs
CoreDNS 1.10 or later (kubeadm ships it from Kubernetes 1.28).

Each name costs a `hosts` line and a list entry, about twice its length plus 25 bytes: 10,000
names of up to 35 characters (`reviews-v2.bookinfo-prod.remote`) fit the 1 MiB ConfigMap limit.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

from cluster_agent.render.errors import CorefileError
from cluster_agent.render.objects import Manifest, managed_labels, metadata

__all__ = [
    "BEGIN_MARKER",
    "BLOCK_CONFIGMAP",
    "END_MARKER",
    "PRUNE_ANNOTATION",
    "merge_into_corefile",
    "nodelocal_stanza_key",
    "render_coredns_configmaps",
    "render_nodelocal_stanza",
    "render_server_block",
    "server_block_key",
]

BEGIN_MARKER = "# meshbridge:begin"
END_MARKER = "# meshbridge:end"
BLOCK_CONFIGMAP = "meshbridge-coredns"
# The merged `coredns` ConfigMap belongs to the cluster; whoever prunes meshbridge's objects must
# update it, never delete it.
PRUNE_ANNOTATION = "meshbridge.io/prune"

# expr-lang refuses an expression of more than 10,000 nodes, each listed name being one
# (expr-lang parser/parser.go, conf.DefaultMaxNodes): larger imports get one view block per slice.
NAMES_PER_VIEW = 5000

_SCHEMES = ("dns://", "tls://", "grpc://", "https://", "quic://")


def server_block_key(suffix: str) -> str:
    """ConfigMap key of the block in `meshbridge-coredns`: `<suffix>.server`."""
    return f"{suffix}.server"


def nodelocal_stanza_key(suffix: str) -> str:
    """ConfigMap key of the NodeLocal DNSCache stanza in `meshbridge-coredns`."""
    return f"nodelocaldns.{suffix}.server"


def _soa(suffix: str, ttl: int) -> str:
    # names and timers as the kubernetes plugin's SOA (plugin/backend_lookup.go `SOA`); TTL and
    # minimum (the negative-caching TTL) from dns.ttl
    return f"{suffix}. {ttl} IN SOA ns.dns.{suffix}. hostmaster.{suffix}. 1 7200 1800 86400 {ttl}"


def render_server_block(suffix: str, vips: Mapping[str, str], *, ttl: int = 30) -> str:
    """The server blocks answering `<name>.<suffix>` with each name's VIP (keys of `vips` are
    import names such as `ratings.bookinfo`) and any other name under the suffix NXDOMAIN."""
    entries = sorted((f"{name}.{suffix}", address) for name, address in vips.items())
    lines = [
        f"# meshbridge: {len(entries)} imported name(s) under {suffix}.; other names NXDOMAIN; never forwarded",
    ]
    for start in range(0, len(entries), NAMES_PER_VIEW):
        lines += _imported_names_block(suffix, entries[start : start + NAMES_PER_VIEW], ttl)
    zone = suffix.replace(".", "[.]")
    soa = _soa(suffix, ttl)
    lines += [
        f"{suffix}:53 {{",
        "    errors",
        "    template ANY ANY {",
        f"        match ^(?:[^.]+[.])?{zone}[.]$",
        f'        authority "{soa}"',
        "        fallthrough",
        "    }",
        "    template ANY ANY {",
        "        rcode NXDOMAIN",
        f'        authority "{soa}"',
        "    }",
        "}",
    ]
    return "\n".join(lines) + "\n"


def _imported_names_block(suffix: str, entries: list[tuple[str, str]], ttl: int) -> list[str]:
    listed = ",".join(f"'{host}.'" for host, _ in entries)
    return [
        f"{suffix}:53 {{",
        "    view meshbridge-imported {",
        f"        expr name() in [{listed}]",
        "    }",
        "    errors",
        "    hosts {",
        *(f"        {address} {host}" for host, address in entries),
        f"        ttl {ttl}",
        "        no_reverse",
        "    }",
        "}",
    ]


def render_nodelocal_stanza(suffix: str, *, bind: Iterable[str], forward_to: str) -> str:
    """The server block an operator adds to NodeLocal DNSCache's Corefile (ConfigMap
    `node-local-dns`, which mounts only its `Corefile` key) so `<suffix>` reaches the cluster DNS.

    NodeLocal forwards only the cluster domain and the reverse zones to the cluster DNS; `.` goes
    to the node's upstream servers (kubernetes cluster/addons/dns/nodelocaldns/nodelocaldns.yaml),
    so without this stanza no `*.<suffix>` query reaches the meshbridge block. It copies the
    cluster domain's block there: the same cache, `bind` (both addresses node-local-dns listens
    on) and `forward` to `__PILLAR__CLUSTER__DNS__` over TCP, which node-cache fills in with the
    kube-dns-upstream Service (README.md there); `health` stays with the cluster domain's block.
    """
    return (
        "\n".join(
            [
                "# meshbridge: add to NodeLocal DNSCache's Corefile, beside its cluster domain's block",
                f"{suffix}:53 {{",
                "    errors",
                "    cache {",
                "            success 9984 30",
                "            denial 9984 5",
                "    }",
                "    reload",
                "    loop",
                f"    bind {' '.join(bind)}",
                f"    forward . {forward_to} {{",
                "            force_tcp",
                "    }",
                "    prometheus :9253",
                "}",
            ]
        )
        + "\n"
    )


def _marker_lines(lines: list[str], marker: str) -> list[int]:
    return [i for i, line in enumerate(lines) if line.strip() == marker]


def merge_into_corefile(corefile: str, block: str) -> str:
    """Put `block` between the meshbridge markers: replaced when the markers exist, appended
    otherwise. Everything outside the markers is kept byte for byte, and merging the same block
    again returns the same text.

    Raises CorefileError when the markers are broken (one missing, duplicated, or end before
    begin), or when the Corefile already serves the block's zone outside the markers — CoreDNS
    would refuse to start with two servers for one zone and port.
    """
    lines = corefile.splitlines(keepends=True)
    begins, ends = _marker_lines(lines, BEGIN_MARKER), _marker_lines(lines, END_MARKER)
    body = block if block.endswith("\n") else block + "\n"
    if not begins and not ends:
        outside = corefile
    elif len(begins) == 1 and len(ends) == 1 and begins[0] < ends[0]:
        outside = "".join(lines[: begins[0]] + lines[ends[0] + 1 :])
    else:
        raise CorefileError(
            f"Corefile markers are broken: found {len(begins)} '{BEGIN_MARKER}' line(s) at "
            f"{_line_numbers(begins)} and {len(ends)} '{END_MARKER}' line(s) at {_line_numbers(ends)}; "
            f"expected exactly one of each, begin first. Fix or remove them by hand."
        )
    clash = _server_keys(body) & _server_keys_with_lines(outside).keys()
    if clash:
        zone, port = sorted(clash)[0]
        line = _server_keys_with_lines(outside)[(zone, port)]
        raise CorefileError(
            f"Corefile line {line} already defines a server for {zone}:{port} outside the meshbridge "
            f"markers; remove that server block (meshbridge manages it between the markers)"
        )
    if not begins:
        prefix = corefile if not corefile or corefile.endswith("\n") else corefile + "\n"
        separator = "\n" if prefix.strip() else ""
        return f"{prefix}{separator}{BEGIN_MARKER}\n{body}{END_MARKER}\n"
    end_line = lines[ends[0]]
    newline = end_line[len(end_line.rstrip("\r\n")) :]
    section = f"{BEGIN_MARKER}\n{body}{END_MARKER}{newline}"
    return "".join(lines[: begins[0]]) + section + "".join(lines[ends[0] + 1 :])


def _line_numbers(indexes: list[int]) -> str:
    return ", ".join(str(i + 1) for i in indexes) or "none"


def _server_keys(text: str) -> set[tuple[str, int]]:
    return set(_server_keys_with_lines(text))


def _server_keys_with_lines(text: str) -> dict[tuple[str, int], int]:
    """(zone, port) of every server block at brace depth 0, with the line it starts on."""
    keys: dict[tuple[str, int], int] = {}
    depth = 0
    pending: list[tuple[str, int]] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0]
        for token in re.findall(r"[{}]|[^\s{},]+", line):
            if token == "{":
                if depth == 0:
                    for key in pending:
                        keys.setdefault(key, number)
                    pending = []
                depth += 1
            elif token == "}":
                depth = max(depth - 1, 0)
            elif depth == 0:
                pending.append(_zone_and_port(token))
    return keys


def _zone_and_port(token: str) -> tuple[str, int]:
    for scheme in _SCHEMES:
        if token.lower().startswith(scheme):
            token = token[len(scheme) :]
            break
    zone, _, port = token.rpartition(":") if ":" in token else (token, "", "53")
    try:
        number = int(port)
    except ValueError:
        number = 53
    zone = zone.lower().rstrip(".") or "."
    return zone, number


def render_coredns_configmaps(
    suffix: str,
    vips: Mapping[str, str],
    *,
    cluster: str,
    namespace: str = "kube-system",
    ttl: int = 30,
    corefile: str | None = None,
    corefile_configmap: str = "coredns",
    corefile_key: str = "Corefile",
    nodelocal_stanza: str | None = None,
) -> list[Manifest]:
    """ConfigMap `meshbridge-coredns` (key `<suffix>.server`, and `nodelocaldns.<suffix>.server`
    when a NodeLocal DNSCache stanza is given) and, given the current Corefile, the `coredns`
    ConfigMap with the block merged in."""
    block = render_server_block(suffix, vips, ttl=ttl)
    data = {server_block_key(suffix): block}
    if nodelocal_stanza is not None:
        data[nodelocal_stanza_key(suffix)] = nodelocal_stanza
    objects: list[Manifest] = [
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": metadata(BLOCK_CONFIGMAP, namespace, managed_labels(cluster, "dns")),
            "data": data,
        }
    ]
    if corefile is not None:
        objects.append(
            {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": metadata(
                    corefile_configmap,
                    namespace,
                    managed_labels(cluster, "dns"),
                    {PRUNE_ANNOTATION: "never"},
                ),
                "data": {corefile_key: merge_into_corefile(corefile, block)},
            }
        )
    return objects


def names_in_block(block: str) -> Iterable[tuple[str, str]]:
    """(host, address) pairs of a rendered block; for tests and diagnostics."""
    inside = False
    for line in block.splitlines():
        stripped = line.strip()
        if stripped == "hosts {":
            inside = True
        elif stripped == "}":
            inside = False
        elif inside and not stripped.startswith(("ttl ", "no_reverse", "fallthrough", "reload ")):
            address, host = stripped.split()
            yield host, address
