"""The audit chain: every change recorded in its own transaction, tampering found, and no change
without its record."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import text

from ca_server.core.audit import verify_chain
from ca_server.storage import tables as t
from cluster_agent import pki
from tests.ca.conftest import Harness

CLI = [sys.executable, "-m", "ca_server.cli"]


def report(h: Harness) -> str:
    r = verify_chain(h.store.iter_audit(), head=h.store.audit_head())
    return "ok" if r.ok else r.problem


def sql(h: Harness, statement: str) -> None:
    with h.store.engine.begin() as conn:
        conn.execute(text(statement))


def busy_history(h: Harness) -> None:
    a = h.enroll("a", trust_domain="a.mesh")
    h.renew(a)
    h.rotate("a")
    h.client.post(f"/v1/certificates/{a.serial}/revoke", json={"reason": "superseded"}, headers=h.admin)


def test_every_change_is_recorded_in_order_and_the_chain_verifies(harness: Harness) -> None:
    busy_history(harness)
    harness.enroll("b")
    harness.client.post("/v1/clusters/b/revoke", json={"reason": "keyCompromise"}, headers=harness.admin)
    harness.client.post("/v1/roots", json={}, headers=harness.admin)
    r = harness.client.get("/v1/audit", params={"limit": 1000}, headers=harness.admin)
    assert r.status_code == 200
    items = r.json()["items"]
    actions = [i["action"] for i in items]
    expected = [
        "root.create",
        "admin_token.create",
        "crl.sign",  # init
        "cluster.create",
        "bootstrap_token.create",
        "intermediate.enroll",
        "intermediate.renew",
        "cluster.rotate",
        "certificate.revoke",
        "crl.sign",
        "cluster.create",
        "bootstrap_token.create",
        "intermediate.enroll",
        "cluster.revoke",
        "crl.sign",
        "root.create",
        "crl.sign",
    ]
    assert actions == expected
    assert [i["id"] for i in items] == list(range(1, len(expected) + 1))
    assert items[3]["subject"] == "a" and items[3]["actor"].startswith("admin:")
    assert items[3]["details"] == {"trust_domain": "a.mesh", "gateway": None}
    assert items[6]["actor"] == "agent:a" and "serial" in items[6]["details"]
    assert all(len(i["hash"]) == 64 for i in items)
    page = harness.client.get("/v1/audit", params={"after": 3, "limit": 2}, headers=harness.admin).json()["items"]
    assert [i["id"] for i in page] == [4, 5]
    assert len(harness.client.get("/v1/audit", headers=harness.admin).json()["items"]) == len(expected)
    for bad in ({"limit": 0}, {"limit": 5000}, {"after": -1}, {"after": "x"}):
        assert harness.client.get("/v1/audit", params=bad, headers=harness.admin).status_code == 400
    assert report(harness) == "ok"
    # nothing secret is in the audit log
    dump = json.dumps(items)
    assert harness.admin_token not in dump and "mbboot." not in dump and "mbagent." not in dump


def test_an_altered_row_is_named(harness: Harness) -> None:
    busy_history(harness)
    sql(harness, "UPDATE audit SET subject = 'b' WHERE id = 7")
    assert report(harness) == "entry 7 was altered (hash mismatch)"


def test_altered_details_are_found(harness: Harness) -> None:
    busy_history(harness)
    sql(harness, "UPDATE audit SET details = '{\"reason\": \"unspecified\"}' WHERE action = 'certificate.revoke'")
    assert "was altered" in report(harness)


def test_a_deleted_row_is_named(harness: Harness) -> None:
    busy_history(harness)
    sql(harness, "DELETE FROM audit WHERE id = 5")
    assert report(harness) == "entry 5 is missing (next present is 6)"


def test_a_deleted_tail_is_found(harness: Harness) -> None:
    busy_history(harness)
    last = harness.count(t.audit)
    sql(harness, f"DELETE FROM audit WHERE id >= {last - 1}")  # noqa: S608 (an int of ours)
    assert report(harness) == f"entries {last - 1}..{last} are missing (the head says {last})"


def test_a_relinked_row_is_found(harness: Harness) -> None:
    busy_history(harness)
    sql(harness, "UPDATE audit SET prev_hash = '" + "1" * 64 + "' WHERE id = 4")
    assert report(harness) == "entry 4 does not link to entry 3"


def _fail_audit_inserts(h: Harness) -> None:
    if h.postgres:
        sql(
            h,
            "CREATE FUNCTION refuse_audit() RETURNS trigger LANGUAGE plpgsql AS "
            "$$ BEGIN RAISE EXCEPTION 'audit storage failed'; END $$",
        )
        sql(h, "CREATE TRIGGER refuse_audit BEFORE INSERT ON audit FOR EACH ROW EXECUTE FUNCTION refuse_audit()")
    else:
        sql(
            h,
            "CREATE TRIGGER refuse_audit BEFORE INSERT ON audit BEGIN SELECT RAISE(ABORT, 'audit storage failed'); END",
        )


def _heal_audit(h: Harness) -> None:
    sql(h, "DROP TRIGGER refuse_audit ON audit" if h.postgres else "DROP TRIGGER refuse_audit")


def test_when_the_audit_record_cannot_be_written_the_change_does_not_happen(harness: Harness) -> None:
    a = harness.enroll("a")
    token_b = harness.add_cluster("b")["bootstrap_token"]
    _fail_audit_inserts(harness)
    before = harness.state()
    key = pki.new_key()
    attempts = [
        harness.client.post("/v1/clusters", json={"name": "c"}, headers=harness.admin),
        harness.client.post(
            "/v1/enroll", json={"cluster": "b", "bootstrap_token": token_b, "csr": pki.make_csr(key, "b")}
        ),
        harness.renew_response(a)[0],
        harness.client.post("/v1/clusters/a/rotate", json={}, headers=harness.admin),
        harness.client.post(f"/v1/certificates/{a.serial}/revoke", json={}, headers=harness.admin),
        harness.client.post("/v1/clusters/a/revoke", json={}, headers=harness.admin),
        harness.client.post("/v1/roots", json={}, headers=harness.admin),
        harness.client.post("/v1/clusters/a/bootstrap-token", headers=harness.admin),
    ]
    for r in attempts:
        assert r.status_code in (409, 503), r.text
        assert r.headers["content-type"] == "application/problem+json"
        assert "audit storage failed" not in r.text  # database text is not echoed
    assert harness.state() == before
    assert harness.desired(a)["generation"] == 1
    _heal_audit(harness)
    # the bootstrap token was not consumed by the failed enrollment
    r = harness.client.post(
        "/v1/enroll", json={"cluster": "b", "bootstrap_token": token_b, "csr": pki.make_csr(key, "b")}
    )
    assert r.status_code == 201, r.text
    assert report(harness) == "ok"


# ------------------------------------------------------------------------------------ the CLI
def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args], capture_output=True, text=True, timeout=120, env={**os.environ, **(env or {})}, check=False
    )


@pytest.fixture
def initialised(database_url: str, tmp_path: Path) -> tuple[Path, str]:
    d = tmp_path / "ca"
    r = _cli("init", "--data-dir", str(d), "--database-url", database_url)
    assert r.returncode == 0, r.stderr
    return d, database_url


def test_cli_audit_verify_exit_codes(initialised: tuple[Path, str]) -> None:
    from sqlalchemy import create_engine

    d, url = initialised
    ok = _cli("audit", "verify", "--data-dir", str(d))
    assert ok.returncode == 0, ok.stderr
    assert "intact: 3 entries" in ok.stdout
    js = _cli("audit", "verify", "--data-dir", str(d), "--json", "--database-url", url)
    assert json.loads(js.stdout) == {"ok": True, "checked": 3, "problem": ""}
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text("UPDATE audit SET actor = 'someone else' WHERE id = 2"))
    bad = _cli("audit", "verify", "--data-dir", str(d))
    assert bad.returncode == 1
    assert "entry 2 was altered" in bad.stderr
    with engine.begin() as conn:
        conn.execute(text("DELETE FROM audit WHERE id = 2"))
    gone = _cli("audit", "verify", "--data-dir", str(d), "--json")
    assert gone.returncode == 1
    assert json.loads(gone.stdout)["problem"] == "entry 2 is missing (next present is 3)"
    engine.dispose()
    missing = _cli("audit", "verify", "--data-dir", str(d.parent / "nothing-here"))
    assert missing.returncode == 2 and "init" in missing.stderr


def test_a_clock_in_another_time_zone_keeps_the_chain_verifiable(harness: Harness) -> None:
    from datetime import datetime, timedelta, timezone

    from ca_server.core.authority import Authority
    from ca_server.keys.file import FileKeyBackend
    from tests.ca.conftest import PASSPHRASE

    cest = timezone(timedelta(hours=2))
    authority = Authority(harness.store, FileKeyBackend(harness.data_dir, PASSPHRASE), clock=lambda: datetime.now(cest))
    authority.create_cluster(name="a", trust_domain="a.mesh", gateway=None, actor="test")
    assert report(harness) == "ok"
