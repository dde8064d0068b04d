"""A real CA service (the production app, uvicorn, HTTPS with a root-issued server certificate)
running in a thread of the test process, for agent tests. Its Authority is reachable directly so
tests can act as the operator."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import uvicorn

from ca_server.app import create_app
from ca_server.core.authority import Authority, Policy
from ca_server.keys.base import KeyType
from ca_server.keys.file import FileKeyBackend
from ca_server.server import ServerCertificate, http_protocol
from ca_server.speedups import ALL_ON, Speedups
from ca_server.storage.migrate import upgrade
from ca_server.storage.repository import SqlStore
from tests.support.pgserver import free_port


class CAService:
    def __init__(
        self,
        data_dir: Path,
        *,
        database_url: str | None = None,
        speedups: Speedups = ALL_ON,
        policy: Policy | None = None,
    ) -> None:
        data_dir.mkdir(parents=True, exist_ok=True)
        self.data_dir = data_dir
        store = SqlStore(
            database_url or f"sqlite:///{data_dir / 'meshbridge.db'}", prepared_statements=speedups.prepared_statements
        )
        upgrade(store.engine)
        self.authority = Authority(store, FileKeyBackend(data_dir, b"test passphrase"), policy=policy or Policy())
        _, self.admin_token = self.authority.init_root(key_type=KeyType.ECDSA_P256)
        self.port = free_port()
        self.url = f"https://127.0.0.1:{self.port}"
        self.server_cert = ServerCertificate(self.authority, names=["127.0.0.1"])
        self.server_cert.refresh()
        self.app = create_app(self.authority, watch_interval=0.1, agent_shortcut=speedups.agent_shortcut)
        config = uvicorn.Config(
            self.app,
            host="127.0.0.1",
            port=self.port,
            log_config=None,
            access_log=False,
            timeout_graceful_shutdown=1,
            http=http_protocol(joined_writes=speedups.joined_writes),
        )
        config.load()
        config.ssl = self.server_cert.ctx
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def start(self) -> CAService:
        self.thread.start()
        deadline = time.monotonic() + 15
        while not self.server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("CA service did not start")
            time.sleep(0.02)
        self.write_trust_anchor()
        return self

    def write_trust_anchor(self) -> Path:
        path = self.data_dir / "root-cert.pem"
        path.write_text(self.authority.trust_bundle_from(self.authority.list_roots()))
        return path

    def add_cluster(self, name: str, trust_domain: str, token_file: Path) -> None:
        made = self.authority.create_cluster(name=name, trust_domain=trust_domain, gateway=None, actor="test")
        token_file.write_text(made.bootstrap_token + "\n")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.authority.store.dispose()  # type: ignore[attr-defined]
