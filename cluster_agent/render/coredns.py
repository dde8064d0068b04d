"""CoreDNS: a server block for the import suffix, and merging it into a Corefile.

The block is a separate server (`remote:53 { … }`, ISTIO-NOTES "CoreDNS") that never forwards:

    remote:53 {
        errors
        hosts {
            240.240.18.7 ratings.bookinfo.remote
            ttl 30
            no_reverse
        }
    }

What CoreDNS's `hosts` plugin (plugin/hosts/hosts.go, `ServeDNS`) answers from it, without
`fallthrough` and with no plugin after it:
- A for an imported name: its VIP;
- any other type (AAAA, MX, TXT, …) for an imported name: NOERROR with no data, because the name
  has records (`otherRecordsExist`);
- any query for a name under the suffix that is not imported: SERVFAIL. The plugin deliberately
  answers SERVFAIL rather than NXDOMAIN (it has no SOA to put in the negative answer), and the
  `template` plugin, the inline way to produce NXDOMAIN, runs *before* `hosts` in CoreDNS's plugin
  order, so it cannot serve as a catch-all behind it. Nothing is forwarded upstream either way.
One line per name (~45 bytes) keeps 10,000 imports near 450 KB, under the 1 MiB ConfigMap limit.
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
    "render_coredns_configmaps",
    "render_server_block",
    "server_block_key",
]

BEGIN_MARKER = "# meshbridge:begin"
END_MARKER = "# meshbridge:end"
BLOCK_CONFIGMAP = "meshbridge-coredns"
# The merged `coredns` ConfigMap belongs to the cluster; whoever prunes meshbridge's objects must
# update it, never delete it.
PRUNE_ANNOTATION = "meshbridge.io/prune"

_SCHEMES = ("dns://", "tls://", "grpc://", "https://", "quic://")


def server_block_key(suffix: str) -> str:
    """ConfigMap key of the block in `meshbridge-coredns`: `<suffix>.server`."""
    return f"{suffix}.server"


def render_server_block(suffix: str, vips: Mapping[str, str], *, ttl: int = 30) -> str:
    """The server block answering `<name>.<suffix>` with each name's VIP (keys of `vips` are
    import names such as `ratings.bookinfo`)."""
    entries = sorted((f"{name}.{suffix}", address) for name, address in vips.items())
    lines = [
        f"# meshbridge: {len(entries)} imported name(s) under {suffix}.; answered here, never forwarded",
        f"{suffix}:53 {{",
        "    errors",
        "    hosts {",
        *(f"        {address} {host}" for host, address in entries),
        f"        ttl {ttl}",
        "        no_reverse",
        "    }",
        "}",
    ]
    return "\n".join(lines) + "\n"


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
) -> list[Manifest]:
    """ConfigMap `meshbridge-coredns` (key `<suffix>.server`) and, given the current Corefile,
    the `coredns` ConfigMap with the block merged in."""
    block = render_server_block(suffix, vips, ttl=ttl)
    objects: list[Manifest] = [
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": metadata(BLOCK_CONFIGMAP, namespace, managed_labels(cluster, "dns")),
            "data": {server_block_key(suffix): block},
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
