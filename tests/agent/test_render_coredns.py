"""CoreDNS: the server block, Corefile merging (idempotent, byte-identical outside the markers),
and, where a real `coredns` binary is available, what CoreDNS answers from the block."""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import dns.exception
import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import pytest

from cluster_agent.render import CorefileError, merge_into_corefile, render_coredns_configmaps, render_server_block
from cluster_agent.render.coredns import BEGIN_MARKER, END_MARKER, names_in_block
from tests.support.corefile import KUBEADM_COREFILE

VIPS = {"ratings.bookinfo": "241.0.0.7", "details.bookinfo": "241.0.3.1"}
TEN_THOUSAND = {f"service-{i:05d}.namespace-{i % 97:02d}": f"241.0.{i // 250}.{i % 250 + 1}" for i in range(10_000)}


def test_block_answers_each_name_and_never_forwards() -> None:
    block = render_server_block("remote", VIPS, ttl=15)
    lines = block.splitlines()
    assert lines.count("remote:53 {") == 2  # the imported names' view block, then the catch-all
    assert "        expr name() in ['details.bookinfo.remote.','ratings.bookinfo.remote.']" in lines
    assert "        241.0.3.1 details.bookinfo.remote" in lines
    assert "        241.0.0.7 ratings.bookinfo.remote" in lines
    assert "        ttl 15" in lines
    assert (
        lines.count('        authority "remote. 15 IN SOA ns.dns.remote. hostmaster.remote. 1 7200 1800 86400 15"') == 2
    )
    assert "        rcode NXDOMAIN" in lines
    directives = [line.split()[0] for line in lines if line.strip() and not line.lstrip().startswith("#")]
    assert "forward" not in directives
    assert dict(names_in_block(block)) == {
        "details.bookinfo.remote": "241.0.3.1",
        "ratings.bookinfo.remote": "241.0.0.7",
    }


def test_block_regex_escapes_the_suffix_dots() -> None:
    block = render_server_block("mesh.example", VIPS)
    assert "        match ^(?:[^.]+[.])?mesh[.]example[.]$" in block.splitlines()
    assert "mesh.example:53 {" in block.splitlines()


def test_block_without_names_is_only_the_catch_all() -> None:
    block = render_server_block("remote", {})
    assert block.count("remote:53 {") == 1 and "view" not in block and "hosts" not in block
    assert "rcode NXDOMAIN" in block


def test_block_is_deterministic_and_sorted() -> None:
    reversed_vips = dict(reversed(list(VIPS.items())))
    assert render_server_block("remote", VIPS) == render_server_block("remote", reversed_vips)
    hosts = [host for host, _ in names_in_block(render_server_block("remote", VIPS))]
    assert hosts == sorted(hosts)


def test_ten_thousand_names_fit_a_configmap() -> None:
    block = render_server_block("remote", TEN_THOUSAND)
    merged = merge_into_corefile(KUBEADM_COREFILE, block)
    assert len(merged.encode()) < 900 * 1024  # names of 33 characters; the limit is 1 MiB
    # expr-lang refuses more than 10,000 nodes per expression: 5,000 names per view block
    views = [line for line in block.splitlines() if line.startswith("        expr name() in [")]
    assert [line.count("','") + 1 for line in views] == [5000, 5000]
    assert dict(names_in_block(block)) == {f"{n}.remote": a for n, a in TEN_THOUSAND.items()}


def test_merge_appends_between_markers_and_keeps_the_rest() -> None:
    block = render_server_block("remote", VIPS)
    merged = merge_into_corefile(KUBEADM_COREFILE, block)
    assert merged.startswith(KUBEADM_COREFILE)
    assert merged[len(KUBEADM_COREFILE) :] == f"\n{BEGIN_MARKER}\n{block}{END_MARKER}\n"


def test_merge_is_idempotent() -> None:
    block = render_server_block("remote", VIPS)
    once = merge_into_corefile(KUBEADM_COREFILE, block)
    assert merge_into_corefile(once, block) == once
    assert merge_into_corefile(merge_into_corefile(once, block), block) == once


def test_merge_replaces_only_the_marked_section() -> None:
    head = "# operator's comment\n.:53 {\n    forward . 8.8.8.8\n}\n"
    tail = "example.org:53 {\n    whoami\n}"  # no final newline: kept as it is
    old_block = render_server_block("remote", {"a.b": "241.0.0.1"})
    text = f"{head}    {BEGIN_MARKER}\nstale text\n{END_MARKER}   \n{tail}"
    new_block = render_server_block("remote", VIPS)
    merged = merge_into_corefile(text, new_block)
    assert merged == f"{head}{BEGIN_MARKER}\n{new_block}{END_MARKER}\n{tail}"
    again = merge_into_corefile(merge_into_corefile(merged, old_block), new_block)
    assert again == merged


def test_merge_keeps_bytes_outside_markers_exactly() -> None:
    head = ".:53 {\r\n    forward . /etc/resolv.conf\r\n}\r\n\t# tabs, CRLF and unicode: ü\r\n"
    tail = "\r\n# trailing\r\n"
    text = f"{head}{BEGIN_MARKER}\r\nold\r\n{END_MARKER}\r\n{tail}"
    merged = merge_into_corefile(text, render_server_block("remote", VIPS))
    assert merged.startswith(head)
    assert merged.endswith(f"{END_MARKER}\r\n{tail}")


def test_merge_into_an_empty_corefile_and_one_without_final_newline() -> None:
    block = render_server_block("remote", VIPS)
    assert merge_into_corefile("", block) == f"{BEGIN_MARKER}\n{block}{END_MARKER}\n"
    merged = merge_into_corefile(".:53 {\n}", block)
    assert merged.startswith(".:53 {\n}\n\n" + BEGIN_MARKER)
    assert merge_into_corefile(merged, block) == merged


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (f".:53 {{\n}}\n{BEGIN_MARKER}\nremote:53 {{\n}}\n", "found 1 '# meshbridge:begin' line"),
        (f".:53 {{\n}}\n{END_MARKER}\n", "found 0 '# meshbridge:begin' line"),
        (f"{BEGIN_MARKER}\n{BEGIN_MARKER}\n{END_MARKER}\n", "found 2 '# meshbridge:begin' line(s) at 1, 2"),
        (f"{BEGIN_MARKER}\n{END_MARKER}\n{END_MARKER}\n", "and 2 '# meshbridge:end' line(s) at 2, 3"),
        (f"{END_MARKER}\n{BEGIN_MARKER}\n", "begin first"),
    ],
)
def test_broken_markers_are_refused(text: str, message: str) -> None:
    with pytest.raises(CorefileError) as info:
        merge_into_corefile(text, render_server_block("remote", VIPS))
    assert message in str(info.value)


@pytest.mark.parametrize(
    "key", ["remote:53", "remote.:53", "remote", "dns://remote:53", ".:53 remote:53", "a.b, remote"]
)
def test_a_server_for_the_suffix_outside_the_markers_is_refused(key: str) -> None:
    text = KUBEADM_COREFILE + f"{key} {{\n    forward . 10.0.0.1\n}}\n"
    with pytest.raises(CorefileError, match=r"already defines a server for remote:53"):
        merge_into_corefile(text, render_server_block("remote", VIPS))


@pytest.mark.parametrize("key", ["remote:5353", "other.remote:53", "myremote:53", "# remote:53"])
def test_other_servers_do_not_clash(key: str) -> None:
    text = KUBEADM_COREFILE + f"{key} {{\n    whoami\n}}\n"
    merged = merge_into_corefile(text, render_server_block("remote", VIPS))
    assert merged.startswith(text)


def test_configmaps_per_api() -> None:
    objects = render_coredns_configmaps("remote", VIPS, cluster="b", corefile=KUBEADM_COREFILE)
    block_cm, merged_cm = objects
    assert block_cm["metadata"]["name"] == "meshbridge-coredns"
    assert block_cm["metadata"]["namespace"] == "kube-system"
    assert list(block_cm["data"]) == ["remote.server"]
    assert block_cm["data"]["remote.server"] == render_server_block("remote", VIPS)
    assert merged_cm["metadata"]["name"] == "coredns"
    assert merged_cm["data"] == {"Corefile": merge_into_corefile(KUBEADM_COREFILE, render_server_block("remote", VIPS))}
    assert merged_cm["metadata"]["annotations"] == {"meshbridge.io/prune": "never"}
    for obj in objects:
        assert obj["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "meshbridge"
    assert len(render_coredns_configmaps("mesh.example", VIPS, cluster="b")) == 1
    assert "mesh.example.server" in render_coredns_configmaps("mesh.example", VIPS, cluster="b")[0]["data"]


# ------------------------------------------------------------------------------------------------
# Real CoreDNS (from `make testbin`; a missing binary fails the test): what the block answers.


def _coredns_binary() -> str | None:
    candidates = [os.environ.get("MESHBRIDGE_COREDNS", ""), shutil.which("coredns") or ""]
    testbin = os.environ.get("MESHBRIDGE_TESTBIN")
    if testbin:
        candidates.append(str(Path(testbin) / "bin" / "coredns"))
    candidates += sorted(glob.glob(str(Path.home() / ".cache/meshbridge/testbin/*/bin/coredns")))
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


def _free_udp_port() -> int:
    """A port free for both UDP and TCP on loopback: CoreDNS listens on both."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp, socket.socket() as tcp:
            udp.bind(("127.0.0.1", 0))
            port: int = udp.getsockname()[1]
            try:
                tcp.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port


def _query(port: int, name: str, qtype: str) -> dns.message.Message:
    return dns.query.udp(dns.message.make_query(name, qtype), "127.0.0.1", port=port, timeout=2)


def _soa_only(reply: dns.message.Message, suffix: str = "remote.") -> bool:
    """The authority section is exactly the suffix's SOA, whose minimum is the block's TTL."""
    records = [(rrset.name.to_text(), rr) for rrset in reply.authority for rr in rrset]
    return (
        len(records) == 1
        and records[0][0] == suffix
        and records[0][1].rdtype == dns.rdatatype.SOA
        and records[0][1].minimum == 30
    )


@contextmanager
def _coredns(tmp_path: Path, vips: dict[str, str]) -> Iterator[tuple[int, socket.socket]]:
    binary = _coredns_binary()
    if binary is None:  # never a skip: `make test` builds it first
        from tests.e2e.testbin import require

        binary = str(require("coredns"))
    port = _free_udp_port()
    upstream = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # a fake upstream that must stay silent
    upstream.bind(("127.0.0.1", 0))
    upstream.setblocking(False)
    base = f".:53 {{\n    forward . 127.0.0.1:{upstream.getsockname()[1]}\n}}\n"
    block = render_server_block("remote", vips).replace("remote:53 {", f"remote:{port} {{")
    corefile = merge_into_corefile(base.replace(".:53", f".:{port}"), block)
    (tmp_path / "Corefile").write_text(corefile)
    proc = subprocess.Popen(
        [binary, "-conf", str(tmp_path / "Corefile")], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                _query(port, "remote.", "SOA")
                break
            except (OSError, dns.exception.Timeout):
                if proc.poll() is not None or time.monotonic() > deadline:
                    proc.kill()
                    out = proc.stdout.read().decode() if proc.stdout else ""
                    pytest.fail(f"coredns did not start: {out}")
                time.sleep(0.2)
        yield port, upstream
    finally:
        proc.terminate()
        proc.wait(10)
        upstream.close()


@pytest.fixture(scope="module")
def coredns_with_block(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, socket.socket]]:
    with _coredns(tmp_path_factory.mktemp("coredns"), VIPS) as running:
        yield running


def test_coredns_answers_imported_names_from_the_block(coredns_with_block: tuple[int, socket.socket]) -> None:
    port, upstream = coredns_with_block
    reply = _query(port, "ratings.bookinfo.remote.", "A")
    assert reply.rcode() == dns.rcode.NOERROR and reply.flags & dns.flags.AA
    assert [(rr.address, rrset.ttl) for rrset in reply.answer for rr in rrset] == [("241.0.0.7", 30)]
    assert [rr.address for rrset in _query(port, "Details.BookInfo.Remote.", "A").answer for rr in rrset] == [
        "241.0.3.1"
    ]
    for qtype in ("AAAA", "TXT", "MX"):  # the name exists: NOERROR, no data (hosts `otherRecordsExist`)
        other = _query(port, "details.bookinfo.remote.", qtype)
        assert other.rcode() == dns.rcode.NOERROR and not other.answer, qtype
    with pytest.raises(BlockingIOError):
        upstream.recvfrom(512)


@pytest.mark.parametrize("qtype", ["A", "AAAA", "MX", "TXT", "SRV", "ANY"])
@pytest.mark.parametrize("name", ["unknown.bookinfo.remote.", "ratings.other.remote.", "x.ratings.bookinfo.remote."])
def test_coredns_answers_nxdomain_with_soa_for_names_not_imported(
    coredns_with_block: tuple[int, socket.socket], name: str, qtype: str
) -> None:
    """Not SERVFAIL (which `hosts` answers for a name it lacks, and clients retry): NXDOMAIN with
    the suffix's SOA in the authority section, so resolvers cache the negative answer dns.ttl long;
    nothing is forwarded."""
    port, upstream = coredns_with_block
    reply = _query(port, name, qtype)
    assert dns.rcode.to_text(reply.rcode()) == "NXDOMAIN" and not reply.answer
    assert reply.flags & dns.flags.AA and _soa_only(reply)
    with pytest.raises(BlockingIOError):
        upstream.recvfrom(512)


@pytest.mark.parametrize("name", ["remote.", "bookinfo.remote."])
def test_coredns_answers_nodata_for_the_suffix_and_namespace_level(
    coredns_with_block: tuple[int, socket.socket], name: str
) -> None:
    """Names above imported ones exist (empty non-terminals): NOERROR, no data, the SOA; an
    NXDOMAIN there would tell an RFC 8020 resolver that nothing below exists."""
    port, _ = coredns_with_block
    for qtype in ("A", "AAAA"):
        reply = _query(port, name, qtype)
        assert reply.rcode() == dns.rcode.NOERROR and not reply.answer and _soa_only(reply), (name, qtype)


def test_coredns_without_imported_names_answers_nxdomain(tmp_path: Path) -> None:
    with _coredns(tmp_path, {}) as (port, upstream):
        reply = _query(port, "ratings.bookinfo.remote.", "A")
        assert reply.rcode() == dns.rcode.NXDOMAIN and _soa_only(reply)
        with pytest.raises(BlockingIOError):
            upstream.recvfrom(512)


def test_coredns_loads_and_answers_ten_thousand_names(tmp_path: Path) -> None:
    """One view expression of 10,000 names is refused by CoreDNS (expr-lang's node limit); the
    names are split over view blocks, and every block answers its own."""
    with _coredns(tmp_path, TEN_THOUSAND) as (port, _):
        for name in ("service-00000.namespace-00", "service-05000.namespace-53", "service-09999.namespace-08"):
            reply = _query(port, f"{name}.remote.", "A")
            assert [rr.address for rrset in reply.answer for rr in rrset] == [TEN_THOUSAND[name]], name
        assert _query(port, "service-10000.namespace-09.remote.", "A").rcode() == dns.rcode.NXDOMAIN
