"""Issue 5, abuse resistance: schemathesis over the OpenAPI document finds no 5xx and no response
outside the schema; hypothesis-generated PEM/CSR/JSON garbage gets 4xx and changes nothing."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import checks
from starlette.testclient import TestClient

from ca_server.app import create_app
from ca_server.core.authority import Authority
from ca_server.keys.base import KeyType
from ca_server.keys.file import FileKeyBackend
from ca_server.storage.migrate import upgrade
from ca_server.storage.repository import SqlStore
from cluster_agent import pki


class Env:
    def __init__(self, tmp: Path) -> None:
        store = SqlStore(f"sqlite:///{tmp / 'fuzz.db'}")
        upgrade(store.engine)
        self.authority = Authority(store, FileKeyBackend(tmp, b"fuzz passphrase"))
        _, self.admin = self.authority.init_root(key_type=KeyType.ECDSA_P256)
        made = self.authority.create_cluster(name="a", trust_domain="a.mesh", gateway=None, actor="t")
        self.key = pki.new_key()
        done = self.authority.enroll(
            cluster_name="a", bootstrap_token=made.bootstrap_token, csr_pem=pki.make_csr(self.key, "a")
        )
        self.agent = done.agent_token
        self.app = create_app(self.authority)

    def head(self) -> tuple[int, str] | None:
        return self.authority.store.audit_head()


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    e = Env(tmp_path_factory.mktemp("fuzz"))
    yield e
    e.authority.store.dispose()  # type: ignore[attr-defined]


# "no 5xx and no response outside the schema"; schema-valid but semantically wrong input (another
# trust domain's identity, an unknown cluster) is rightly a 4xx, so positive_data_acceptance is not one
CHECKS = [
    checks.not_a_server_error,
    checks.status_code_conformance,
    checks.content_type_conformance,
    checks.response_schema_conformance,
]


def _token_for(case: Any, env: Env) -> str:
    agent_paths = ("exports", "imports", "status", "desired", "intermediate")
    return env.agent if "/clusters/{name}/" in case.path and case.path.endswith(agent_paths) else env.admin


def test_no_5xx_and_every_response_in_the_schema(env: Env) -> None:
    api = schemathesis.openapi.from_asgi("/openapi.json", env.app, headers={"Authorization": f"Bearer {env.admin}"})
    operations = [r.ok() for r in api.get_all_operations()]  # type: ignore[union-attr]
    assert len(operations) >= 20
    seen: dict[str, set[int]] = {}
    for op in operations:

        @given(case=op.as_strategy())
        @settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def run(case: Any) -> None:
            if case.path.endswith("/desired"):
                case.query = {**(case.query or {}), "wait": 0}  # a fuzzer need not wait for the long-poll
            headers = {**(case.headers or {}), "Authorization": f"Bearer {_token_for(case, env)}"}
            response = case.call_and_validate(headers=headers, checks=CHECKS)
            seen.setdefault(f"{case.method} {case.path}", set()).add(response.status_code)

        run()
    assert all(code < 500 for codes in seen.values() for code in codes), seen


# ----------------------------------------------------------------------------- hypothesis garbage
pem_like = st.one_of(
    st.text(max_size=400),
    st.binary(max_size=400).map(
        lambda b: (
            "-----BEGIN CERTIFICATE REQUEST-----\n"
            + base64.encodebytes(b).decode()
            + "-----END CERTIFICATE REQUEST-----\n"
        )
    ),
    st.binary(max_size=300).map(lambda b: base64.b64encode(b).decode()),
)
json_like = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=30),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=12,
)


@given(csr=pem_like, proof=st.text(max_size=100))
@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
def test_garbage_csr_on_renewal_gets_4xx_and_changes_nothing(env: Env, csr: str, proof: str) -> None:
    before = env.head()
    with TestClient(env.app) as c:
        r = c.post(
            "/v1/clusters/a/intermediate",
            json={"csr": csr, "proof": proof},
            headers={"Authorization": f"Bearer {env.agent}"},
        )
    assert 400 <= r.status_code < 500, (r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/problem+json")
    assert env.head() == before


@given(body=json_like)
@settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck))
def test_garbage_json_gets_4xx_everywhere(env: Env, body: Any) -> None:
    before = env.head()
    with TestClient(env.app) as c:
        for method, path, token in (
            ("POST", "/v1/enroll", None),
            ("POST", "/v1/clusters", env.admin),
            ("PUT", "/v1/clusters/a/exports", env.agent),
            ("PUT", "/v1/clusters/a/status", env.agent),
            ("POST", "/v1/roots", env.admin),
        ):
            if path == "/v1/roots" and (
                body is None or body == {} or (isinstance(body, dict) and set(body) <= {"key_type"})
            ):
                continue  # an empty or well-formed body legitimately adds a root
            headers = {"Authorization": f"Bearer {token}"} if token else {}
            r = c.request(method, path, json=body, headers=headers)
            if r.status_code < 400:
                # valid by luck (e.g. an empty status report): fine, but never a server error
                assert r.status_code in (200, 201), (path, r.status_code, r.text)
                continue
            assert r.status_code < 500, (path, r.status_code, r.text)
    if not (
        isinstance(body, dict)
        and body.keys()
        <= {
            "installed_generation",
            "installed_serial",
            "last_reconcile_at",
            "imports_applied",
            "errors",
            "cacerts_not_after",
            "ca_reachable",
        }
    ):
        assert env.head() == before


@given(raw=st.binary(max_size=2000))
@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
def test_garbage_bytes_get_4xx(env: Env, raw: bytes) -> None:
    with TestClient(env.app) as c:
        r = c.post("/v1/enroll", content=raw, headers={"Content-Type": "application/json"})
    assert 400 <= r.status_code < 500
