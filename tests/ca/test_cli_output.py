"""Issue 14 item 7: every `meshbridge-ca` command prints a readable summary by default and JSON
with `--json` (the keys docs/api.md lists); a secret is printed exactly once in either form; an
error is one line on stderr, plus a JSON error object with `--json`; `serve` writes server-url
only once it listens."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from ca_server.cli import PRINTS, main
from cluster_agent import pki
from tests.ca.test_cli import cli, ok, serve

CLUSTER_KEYS = {
    "name",
    "status",
    "generation",
    "trust_domain",
    "gateway",
    "rotation_pending",
    "intermediate",
    "agent_status",
    "exports",
    "installed",
    "served",
    "imports",
}
ROOT_KEYS = {"id", "status", "not_after", "certificate"}
TOKEN_KEYS = {"id", "name", "role", "created_at", "expires_at", "revoked_at", "state"}


def not_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return True
    return False


def test_serve_on_a_taken_port_exits_naming_the_address_and_writes_no_server_url(tmp_path: Path) -> None:
    d = tmp_path / "ca"
    ok("init", "--data-dir", str(d))
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        r = cli("serve", "--data-dir", str(d), "--listen", f"127.0.0.1:{port}", timeout=60)
        assert r.returncode == 1, r.stderr
        assert f"meshbridge-ca: cannot listen on 127.0.0.1:{port}: Address already in use" in r.stderr
        assert not (d / "server-url").exists()
        workers = cli("serve", "--data-dir", str(d), "--listen", f"127.0.0.1:{port}", "--workers", "2", timeout=60)
        assert workers.returncode == 1 and f"cannot listen on 127.0.0.1:{port}" in workers.stderr
        assert not (d / "server-url").exists()


def test_init_audit_backup_restore_both_forms(tmp_path: Path) -> None:
    d = tmp_path / "ca"
    text = ok("init", "--data-dir", str(d))
    assert text.startswith(f"CA initialised in {d}\n") and f"admin token:  {d / 'admin-token'}" in text
    assert not_json(text) and (d / "admin-token").read_text().strip() not in text
    other = json.loads(ok("init", "--data-dir", str(tmp_path / "other"), "--json"))
    assert set(other) >= {"data_dir", "root_id", "root_cert", "admin_token_file", "key", "database", "audit_key_file"}
    verified = ok("audit", "verify", "--data-dir", str(d))
    assert verified.startswith("audit chain intact: ")
    archive = tmp_path / "b.tar.gz"
    summary = ok("backup", "--data-dir", str(d), "--out", str(archive))
    assert summary.startswith(f"backup written to {archive} (mode 0600): ") and not_json(summary)
    tables = json.loads(ok("backup", "--data-dir", str(d), "--out", str(tmp_path / "c.tar.gz"), "--json"))
    assert tables["roots"] == 1
    restored = ok(
        "restore",
        "--data-dir",
        str(tmp_path / "r1"),
        "--in",
        str(archive),
        "--passphrase-file",
        str(d / "key-passphrase"),
        "--audit-key-file",
        str(d / "audit-key"),
    )
    assert restored.startswith(f"restored into {tmp_path / 'r1'}: ") and "audit chain intact" in restored
    again = json.loads(
        ok(
            "restore",
            "--data-dir",
            str(tmp_path / "r2"),
            "--in",
            str(archive),
            "--passphrase-file",
            str(d / "key-passphrase"),
            "--audit-key-file",
            str(d / "audit-key"),
            "--json",
        )
    )
    assert set(again) == {"restored", "audit_entries", "data_dir", "rollback_accepted"}
    refused = cli("init", "--data-dir", str(d), "--json")
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1
    assert refused.stderr.startswith("meshbridge-ca: ") and "refusing to overwrite" in refused.stderr
    err = json.loads(refused.stdout)
    assert err["exit_code"] == 2 and "refusing to overwrite" in err["error"]


def test_operator_commands_both_forms(tmp_path: Path) -> None:
    d = tmp_path / "ca"
    ok("init", "--data-dir", str(d))
    for s in serve(d):
        added = s.op("cluster", "add", "a", "--trust-domain", "a.mesh", "--gateway", "203.0.113.10:15443")
        assert added.startswith("cluster a registered (pending)") and not_json(added)
        boot = next(line.split()[-1] for line in added.splitlines() if line.startswith("bootstrap token:"))
        assert boot.startswith("mbboot.") and added.count(boot) == 1 and "expires:" in added
        as_json = json.loads(s.op("cluster", "add", "b", "--trust-domain", "b.mesh", "--json"))
        assert set(as_json) == {"name", "status", "generation", "bootstrap_token", "bootstrap_expires_at"}
        written = s.op("cluster", "token", "b", "--token-out", str(tmp_path / "b-token"))
        secret = (tmp_path / "b-token").read_text().strip()
        assert f"bootstrap token: written to {tmp_path / 'b-token'} (mode 0600)" in written and secret not in written
        assert (
            json.loads(s.op("cluster", "token", "b", "--token-out", str(tmp_path / "b2"), "--json"))["bootstrap_token"]
            == f"<written to {tmp_path / 'b2'}>"
        )
        with s.http() as http:
            body = {"cluster": "a", "bootstrap_token": boot, "csr": pki.make_csr(pki.new_key(), "a")}
            assert http.post("/v1/enroll", json=body).status_code == 201

        shown = s.op("cluster", "show", "a")
        lines = shown.splitlines()
        assert lines[0].split() == ["cluster:", "a"] and "status:" in lines[1] and lines[1].endswith("active")
        assert any(
            line.split(":", 1)[1].strip() == "203.0.113.10:15443" for line in lines if line.startswith("gateway")
        )
        assert any(line.startswith("intermediate:") and "days)" in line for line in lines) and not_json(shown)
        assert set(json.loads(s.op("cluster", "show", "a", "--json"))) == CLUSTER_KEYS
        listed = s.op("cluster", "list")
        assert listed.splitlines()[0].startswith("NAME") and len(listed.splitlines()) == 3
        assert [set(c) for c in json.loads(s.op("cluster", "list", "--json"))["items"]] == [CLUSTER_KEYS] * 2
        rotated = s.op("cluster", "rotate", "a")
        assert rotated.strip() == "cluster a: rotation requested; its agent renews to generation 2"
        assert json.loads(s.op("cluster", "rotate", "a", "--json")) == {"generation": 2}
        revoked = s.op("cluster", "revoke", "b")
        assert revoked.strip() == "cluster b revoked (cessationOfOperation): its intermediates are in the CRL"
        assert json.loads(s.op("cluster", "revoke", "b", "--json"))["status"] == "revoked"

        added_root = s.op("root", "add")
        assert added_root.startswith("root ") and " added: it joins every trust bundle" in added_root
        assert "CERTIFICATE" not in added_root and "status:    trusted" in added_root
        assert set(json.loads(s.op("root", "list", "--json"))["items"][0]) == ROOT_KEYS
        assert s.op("root", "list").splitlines()[0].split() == ["ID", "STATUS", "NOT", "AFTER"]
        new_id = json.loads(s.op("root", "list", "--json"))["items"][1]["id"]
        refused = cli("root", "activate", new_id, "--data-dir", str(d), "--json")
        assert refused.returncode == 1 and refused.stderr.startswith("meshbridge-ca: Fleet not ready (409)")
        error = json.loads(refused.stdout)
        assert error["status"] == 409 and error["exit_code"] == 1 and error["error"].startswith("Fleet not ready")
        assert [x["cluster"] for x in error["lagging"]] == ["a"] and "\n" not in error["error"]

        made = s.op("token", "create", "oncall", "--role", "viewer")
        secret = next(line.split()[-1] for line in made.splitlines() if line.startswith("token:"))
        assert made.startswith("token oncall created (viewer)") and secret.startswith("mbadmin.")
        assert made.count(secret) == 1 and "expires: never" in made
        made_json = json.loads(s.op("token", "create", "ci", "--role", "viewer", "--json"))
        assert set(made_json) == TOKEN_KEYS | {"token"}
        assert [set(t) for t in json.loads(s.op("token", "list", "--json"))["items"]] == [TOKEN_KEYS] * 3
        gone = s.op("token", "revoke", "oncall")
        assert gone.strip().endswith("(oncall, viewer) revoked: it is refused from now on")
        assert json.loads(s.op("token", "revoke", "ci", "--json"))["state"] == "revoked"

        missing = cli("cluster", "show", "zz", "--data-dir", str(d), "--json")
        assert missing.returncode == 1 and missing.stderr.count("\n") == 1 and "(404)" in missing.stderr
        assert json.loads(missing.stdout) == {
            "error": json.loads(missing.stdout)["error"],
            "exit_code": 1,
            "status": 404,
        }
        log = s.log.read_text()
        assert boot not in log and secret not in log


@pytest.mark.parametrize("command", [["cluster", "list"], ["fleet", "check"], ["root", "status"]])
def test_unreachable_service_with_json_is_a_json_error(tmp_path: Path, command: list[str]) -> None:
    token = tmp_path / "t"
    token.write_text("x\n")
    r = cli(*command, "--url", "https://127.0.0.1:1", "--token-file", str(token), "--json")
    assert r.returncode == 3 and r.stderr.startswith("meshbridge-ca: cannot reach the CA service")
    assert json.loads(r.stdout)["exit_code"] == 3


def test_every_command_says_in_its_help_what_it_prints(capsys: pytest.CaptureFixture[str]) -> None:
    for command in [*PRINTS, "backup", "restore"]:
        with pytest.raises(SystemExit) as done:
            main([*command.split(), "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert done.value.code == 0 and "Prints " in text, command
        assert command == "serve" or "--json" in text.split("Prints ", 1)[1], command
