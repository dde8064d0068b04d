"""CoreDNS: the server block, Corefile merging (idempotent, byte-identical outside the markers),
and, where a real `coredns` binary is available, what CoreDNS answers from the block."""

from __future__ import annotations

import glob
import os
import shutil
import socket
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cluster_agent.render import CorefileError, merge_into_corefile, render_coredns_configmaps, render_server_block
from cluster_agent.render.coredns import BEGIN_MARKER, END_MARKER, names_in_block
from tests.support.corefile import KUBEADM_COREFILE

VIPS = {"ratings.bookinfo": "240.240.0.7", "details.bookinfo": "240.240.3.1"}


def test_block_answers_each_name_and_never_forwards() -> None:
    block = render_server_block("remote", VIPS, ttl=15)
    lines = block.splitlines()
    assert "remote:53 {" in lines
    assert "        240.240.3.1 details.bookinfo.remote" in lines
    assert "        240.240.0.7 ratings.bookinfo.remote" in lines
    assert "        ttl 15" in lines
    directives = [line.split()[0] for line in lines if line.strip() and not line.lstrip().startswith("#")]
    assert "forward" not in directives and "fallthrough" not in directives
    assert dict(names_in_block(block)) == {
        "details.bookinfo.remote": "240.240.3.1",
        "ratings.bookinfo.remote": "240.240.0.7",
    }


def test_block_is_deterministic_and_sorted() -> None:
    reversed_vips = dict(reversed(list(VIPS.items())))
    assert render_server_block("remote", VIPS) == render_server_block("remote", reversed_vips)
    hosts = [host for host, _ in names_in_block(render_server_block("remote", VIPS))]
    assert hosts == sorted(hosts)


def test_ten_thousand_names_fit_a_configmap_twice() -> None:
    vips = {
        f"service-{i:05d}.namespace-{i % 97:02d}": f"240.{240 + i // 65536}.{i // 256 % 256}.{i % 256}"
        for i in range(10_000)
    }
    block = render_server_block("remote", vips)
    merged = merge_into_corefile(KUBEADM_COREFILE, block)
    assert len(block.encode()) < 600 * 1024
    assert len(merged.encode()) < 1024 * 1024


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
    old_block = render_server_block("remote", {"a.b": "240.240.0.1"})
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
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


QTYPES = {"A": 1, "MX": 15, "TXT": 16, "AAAA": 28}


def _query(port: int, name: str, qtype: str) -> tuple[int, list[tuple[int, bytes]]]:
    """(rcode, [(type, rdata)]) of one UDP query; a dozen lines of RFC 1035 instead of a dependency."""
    question = b"".join(bytes([len(label)]) + label.encode() for label in name.rstrip(".").split(".")) + b"\0"
    packet = struct.pack("!HHHHHH", 0x4D42, 0x0100, 1, 0, 0, 0) + question + struct.pack("!HH", QTYPES[qtype], 1)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(2)
        s.sendto(packet, ("127.0.0.1", port))
        reply, _ = s.recvfrom(4096)
    _, flags, qdcount, ancount, _, _ = struct.unpack("!HHHHHH", reply[:12])
    offset = 12 + len(question) + 4 * qdcount
    answers = []
    for _ in range(ancount):
        offset = offset + 2 if reply[offset] & 0xC0 == 0xC0 else reply.index(b"\0", offset) + 1
        rtype, _, _, rdlength = struct.unpack("!HHIH", reply[offset : offset + 10])
        answers.append((rtype, reply[offset + 10 : offset + 10 + rdlength]))
        offset += 10 + rdlength
    return flags & 0xF, answers


@pytest.fixture
def coredns_with_block(tmp_path: Path) -> Iterator[tuple[int, socket.socket]]:
    binary = _coredns_binary()
    if binary is None:  # never a skip: `make test` builds it first
        from tests.e2e.testbin import require

        binary = str(require("coredns"))
    port = _free_udp_port()
    upstream = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # a fake upstream that must stay silent
    upstream.bind(("127.0.0.1", 0))
    upstream.setblocking(False)
    base = f".:53 {{\n    forward . 127.0.0.1:{upstream.getsockname()[1]}\n}}\n"
    block = render_server_block("remote", VIPS).replace("remote:53 {", f"remote:{port} {{")
    corefile = merge_into_corefile(base.replace(".:53", f".:{port}"), block)
    (tmp_path / "Corefile").write_text(corefile)
    proc = subprocess.Popen(
        [binary, "-conf", str(tmp_path / "Corefile")], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                _query(port, "ratings.bookinfo.remote", "A")
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    out = proc.stdout.read().decode() if proc.stdout else ""
                    pytest.fail(f"coredns did not start: {out}")
                time.sleep(0.2)
        yield port, upstream
    finally:
        proc.terminate()
        proc.wait(10)
        upstream.close()


def test_coredns_answers_from_the_block(coredns_with_block: tuple[int, socket.socket]) -> None:
    port, upstream = coredns_with_block
    rcode, answers = _query(port, "ratings.bookinfo.remote", "A")
    assert rcode == 0 and answers == [(1, socket.inet_aton("240.240.0.7"))]
    for qtype in ("AAAA", "TXT", "MX"):
        assert _query(port, "details.bookinfo.remote", qtype) == (0, []), qtype  # NOERROR, no data
    # A name under the suffix that is not imported: SERVFAIL from the hosts plugin, never forwarded.
    assert _query(port, "unknown.bookinfo.remote", "A")[0] == 2
    assert _query(port, "unknown.bookinfo.remote", "AAAA")[0] == 2
    with pytest.raises(BlockingIOError):
        upstream.recvfrom(512)
