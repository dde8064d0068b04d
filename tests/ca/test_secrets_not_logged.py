"""No token, key or passphrase reaches a log record, a repr or an error message."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from ca_server.keys.base import WrongPassphrase
from ca_server.keys.file import FileKeyBackend
from cluster_agent import pki
from meshbridge_wire import logs
from tests.ca.conftest import PASSPHRASE, Harness


def all_text(caplog: pytest.LogCaptureFixture) -> str:
    formatter = logs.JsonFormatter()
    plain = logging.Formatter("%(name)s %(levelname)s %(message)s")
    parts = []
    for record in caplog.records:
        parts.append(plain.format(record))  # includes any traceback
        parts.append(formatter.format(record))
        parts.append(repr(record.__dict__))
    return "\n".join(parts)


def test_a_full_flow_logs_no_secret(harness: Harness, caplog: pytest.LogCaptureFixture, tmp_path: Path) -> None:
    caplog.set_level(logging.DEBUG)
    created = harness.add_cluster("a", trust_domain="a.mesh")
    boot = created["bootstrap_token"]
    a = harness.enroll("a", token=boot)
    harness.renew(a)
    harness.rotate("a")
    harness.renew(a)
    harness.publish(a, trust_domain="a.mesh")
    harness.client.put("/v1/clusters/a/status", json={"installed_generation": 2}, headers=a.headers)
    second_boot = harness.bootstrap_token("a")
    # refusals that carry secrets in the request
    harness.client.post(
        "/v1/enroll", json={"cluster": "a", "bootstrap_token": boot, "csr": pki.make_csr(pki.new_key(), "a")}
    )
    harness.client.post("/v1/enroll", json={"cluster": "a", "bootstrap_token": second_boot, "csr": "garbage"})
    harness.client.post("/v1/enroll", json={"cluster": "a", "bootstrap_token": second_boot, "csr": 7})
    harness.client.get("/v1/clusters", headers={"Authorization": f"Bearer {harness.admin_token}x"})
    harness.client.get("/v1/clusters/zz/desired", headers=a.headers)
    harness.client.post("/v1/clusters/a/revoke", json={}, headers=harness.admin)
    harness.client.get("/v1/clusters/a/desired", headers=a.headers)
    harness.client.get("/metrics")
    with pytest.raises(WrongPassphrase) as err:
        FileKeyBackend(harness.data_dir, b"not the passphrase").load(harness.authority.list_roots()[0].key_ref)
    assert "not the passphrase" not in str(err.value)
    logging.getLogger("meshbridge.test").warning("done", exc_info=err.value)

    text = all_text(caplog)
    assert len(caplog.records) > 5  # the flow was logged at all
    secrets = {
        "admin token": harness.admin_token,
        "bootstrap token": boot,
        "second bootstrap token": second_boot,
        "agent token": a.token,
        "agent token secret": a.token.rsplit(".", 1)[1],
        "passphrase": PASSPHRASE.decode(),
        "intermediate key": pki.key_pem(a.key).splitlines()[1],
    }
    leaked = [what for what, secret in secrets.items() if secret in text]
    assert leaked == []
    assert "PRIVATE KEY" not in text
    # nor are they in the reprs the code hands around
    backend = FileKeyBackend(harness.data_dir, PASSPHRASE)
    assert PASSPHRASE.decode() not in repr(backend)


def test_the_json_formatter_redacts_tokens_and_keys() -> None:
    record = logging.LogRecord(
        "x",
        logging.INFO,
        __file__,
        1,
        "token %s key %s",
        ("mbagent.0123456789abcdef.c2VjcmV0LXNlY3JldA", pki.key_pem(pki.new_key())),
        None,
    )
    out = logs.JsonFormatter().format(record)
    assert "c2VjcmV0LXNlY3JldA" not in out and "BEGIN PRIVATE KEY" not in out
    assert "mbagent.<redacted>" in out
