"""Operators see every audited change in the log once it has committed, by identifier only."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from ca_server.core.authority import Authority
from ca_server.core.errors import Conflict
from ca_server.keys.base import KeyType
from ca_server.keys.file import FileKeyBackend
from ca_server.storage.migrate import upgrade
from ca_server.storage.repository import SqlStore
from cluster_agent import pki


def test_committed_changes_are_logged_and_rolled_back_ones_are_not(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = SqlStore(f"sqlite:///{tmp_path / 'l.db'}")
    upgrade(store.engine)
    authority = Authority(store, FileKeyBackend(tmp_path, b"log test"))
    _, admin = authority.init_root(key_type=KeyType.ECDSA_P256)
    caplog.set_level(logging.INFO, logger="meshbridge.ca.authority")
    made = authority.create_cluster(name="a", trust_domain="a.mesh", gateway=None, actor="admin:x")
    done = authority.enroll(
        cluster_name="a", bootstrap_token=made.bootstrap_token, csr_pem=pki.make_csr(pki.new_key(), "a")
    )
    messages = [r.getMessage() for r in caplog.records]
    assert "cluster.create a" in messages and "intermediate.enroll a" in messages
    enroll_rec = next(r for r in caplog.records if r.getMessage() == "intermediate.enroll a")
    assert getattr(enroll_rec, "serial") == done.issued.serial  # noqa: B009
    for secret in (admin, made.bootstrap_token, done.agent_token):
        assert all(secret not in r.getMessage() and secret not in str(r.__dict__) for r in caplog.records)
    caplog.clear()

    def fail_after_audit(tx: object) -> None:  # the audit rows are written, then the transaction fails
        raise Conflict("simulated failure before commit")

    monkeypatch.setattr(authority.ctx, "changed", fail_after_audit)
    with pytest.raises(Conflict, match="simulated"):
        authority.create_cluster(name="b", trust_domain="b.mesh", gateway=None, actor="admin:x")
    assert not [r for r in caplog.records if r.getMessage().startswith(("cluster.create", "bootstrap_token"))]
    with pytest.raises(Exception, match="no cluster named b"):
        authority.get_cluster("b")
    store.dispose()
