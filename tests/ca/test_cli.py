"""`meshbridge-ca` as operators run it: init, serve over HTTPS on loopback, and the operator
commands against the live server; every root key type; importing an existing PKI."""

from __future__ import annotations

import json
import os
import ssl
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from cluster_agent import pki
from tests.ca.certcheck import openssl_verify, pkilint_errors
from tests.support.pgserver import PgServer, free_port
from tests.support.served import served

CLI = [sys.executable, "-m", "ca_server.cli"]
IMPORT_PASSPHRASE = "import passphrase for tests"


def cli(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("MESHBRIDGE_")}
    return subprocess.run(
        [*CLI, *args], capture_output=True, text=True, timeout=timeout, env={**base, **(env or {})}, check=False
    )


def ok(*args: str, env: dict[str, str] | None = None) -> str:
    r = cli(*args, env=env)
    assert r.returncode == 0, f"{args}: {r.stdout}\n{r.stderr}"
    return r.stdout


@dataclass
class Served:
    data_dir: Path
    url: str
    proc: subprocess.Popen[bytes]
    log: Path

    def http(self) -> httpx.Client:
        trust = ssl.create_default_context(cafile=str(self.data_dir / "root-cert.pem"))
        return httpx.Client(base_url=self.url, verify=trust, timeout=30)

    def op(self, *args: str) -> str:
        return ok(*args, "--data-dir", str(self.data_dir))


def serve(data_dir: Path, *extra: str, env: dict[str, str] | None = None) -> Iterator[Served]:
    port = free_port()
    log = data_dir.parent / f"serve-{port}.log"
    base = {k: v for k, v in os.environ.items() if not k.startswith("MESHBRIDGE_")}
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [*CLI, "serve", "--data-dir", str(data_dir), "--listen", f"127.0.0.1:{port}", *extra],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**base, **(env or {})},
        )
    served = Served(data_dir, f"https://127.0.0.1:{port}", proc, log)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, log.read_text()
            url_file = data_dir / "server-url"  # may still name an earlier serve of data_dir
            if url_file.exists() and url_file.read_text().strip() == served.url:
                with served.http() as c:  # written once it listens: it answers at once
                    assert c.get("/healthz").status_code == 200
                break
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        yield served
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def days_left_column(table: str, name: str) -> tuple[dict[str, str], list[str]]:
    lines = table.strip().splitlines()
    header = lines[0]
    cols = [
        "NAME",
        "STATUS",
        "TRUST DOMAIN",
        "DESIRED",
        "INSTALLED",
        "SERVED",
        "ROTATING",
        "SERIAL",
        "DAYS LEFT",
        "ERRORS",
        "ISTIOD ROOTS",
        "REPORT AGE",
    ]
    starts = [header.index(c) for c in cols]
    rows = {}
    for line in lines[1:]:
        cells = [line[s:e].strip() for s, e in zip(starts, [*starts[1:], None], strict=True)]
        rows[cells[0]] = dict(zip(cols, cells, strict=True))
    return rows[name], cols


# --------------------------------------------------------------------------------- the full flow
def test_init_serve_and_operate(tmp_path: Path) -> None:
    d = tmp_path / "ca"
    out = json.loads(ok("init", "--data-dir", str(d), "--org", "Example Mesh", "--json"))
    assert out["database"] == "sqlite (embedded)" and (d / "meshbridge.db").exists()
    assert out["root_cert"] == str(d / "root-cert.pem")
    assert mode(d / "admin-token") == 0o600 and mode(d / "key-passphrase") == 0o600
    admin_token = (d / "admin-token").read_text().strip()
    root = x509.load_pem_x509_certificate((d / "root-cert.pem").read_bytes())
    assert root.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == "Example Mesh"
    again = cli("init", "--data-dir", str(d))
    assert again.returncode == 2 and "refusing to overwrite" in again.stderr
    assert (d / "admin-token").read_text().strip() == admin_token

    for s in serve(d):
        added = json.loads(
            s.op("cluster", "add", "a", "--trust-domain", "a.mesh", "--gateway", "203.0.113.10:15443", "--json")
        )
        assert added["status"] == "pending" and added["bootstrap_token"].startswith("mbboot.")
        s.op("cluster", "add", "b", "--token-out", str(tmp_path / "b-token"))
        assert mode(tmp_path / "b-token") == 0o600
        key = pki.new_key()
        with s.http() as http:
            r = http.post(
                "/v1/enroll",
                json={"cluster": "a", "bootstrap_token": added["bootstrap_token"], "csr": pki.make_csr(key, "a")},
            )
            assert r.status_code == 201, r.text
            agent = {"Authorization": f"Bearer {r.json()['agent_token']}"}
            a_cert = r.json()["bundle"]["ca-cert.pem"]
            r = http.put("/v1/clusters/a/status", json={"installed_generation": 1, "errors": []}, headers=agent)
            assert r.status_code == 200

        table = s.op("cluster", "list")
        row, _ = days_left_column(table, "a")
        assert row["STATUS"] == "active" and row["DESIRED"] == "1" and row["INSTALLED"] == "1"
        assert row["TRUST DOMAIN"] == "a.mesh" and row["ROTATING"] == "no"
        assert 89 < float(row["DAYS LEFT"]) <= 90
        pending, _ = days_left_column(table, "b")
        assert pending["STATUS"] == "pending" and pending["INSTALLED"] == "-" and pending["DAYS LEFT"] == "-"
        listed = json.loads(s.op("cluster", "list", "--json"))
        assert [c["name"] for c in listed["items"]] == ["a", "b"]

        shown = json.loads(s.op("cluster", "show", "a", "--json"))
        assert (
            shown["gateway"] == {"address": "203.0.113.10", "addresses": None, "port": 15443}
            and shown["generation"] == 1
        )
        assert json.loads(s.op("cluster", "rotate", "a", "--json")) == {"generation": 2}
        row, _ = days_left_column(s.op("cluster", "list"), "a")
        assert row["DESIRED"] == "2" and row["ROTATING"] == "yes"
        token = json.loads(s.op("cluster", "token", "a", "--json"))
        assert token["bootstrap_token"].startswith("mbboot.") and token["bootstrap_expires_at"].endswith("Z")
        assert json.loads(s.op("cluster", "revoke", "b", "--json"))["status"] == "revoked"
        missing = cli("cluster", "show", "zz", "--data-dir", str(d))
        assert missing.returncode == 1 and "(404)" in missing.stderr

        roots = json.loads(s.op("root", "list", "--json"))["items"]
        assert [r["status"] for r in roots] == ["active"]
        new = json.loads(s.op("root", "add", "--key-type", "ecdsa-p384", "--json"))
        assert new["status"] == "trusted" and "certificate" in new
        # serve keeps D/root-cert.pem equal to the trust bundle
        deadline = time.monotonic() + 20
        while len(x509.load_pem_x509_certificates((d / "root-cert.pem").read_bytes())) != 2:
            assert time.monotonic() < deadline, "root-cert.pem did not follow the trust bundle"
            time.sleep(0.2)
        # phase 3 is gated on what a's istiod serves: its agent has not said (no `served`)
        refused = cli("root", "activate", new["id"], "--data-dir", str(d))
        assert refused.returncode == 1 and "Fleet not ready (409)" in refused.stderr
        assert "\n  a: waits for its agent to report what istiod serves" in refused.stderr
        with s.http() as http:  # a's istiod serves the old root only
            seen = served(bundle=roots[0]["certificate"], ca_cert=a_cert, since=datetime.now(UTC))
            body = {"installed_generation": 1, "served": seen}
            assert http.put("/v1/clusters/a/status", json=body, headers=agent).status_code == 200
        status = s.op("root", "status")
        assert f"active root {roots[0]['id']}; workload certificate lifetime 1d + margin 2h24m" in status
        assert f"phase 3: root activate {new['id']}: NOT READY (0 of 1 active clusters ready)" in status
        assert f"phase 4: root retire {new['id']}: NOT READY" in status
        header = next(line for line in status.splitlines() if line.startswith("CLUSTER"))
        assert header.split() == ["CLUSTER", "READY", "READY", "AT", "WAITING", "FOR"]
        row_a = next(line for line in status.splitlines() if line.startswith("a "))
        assert row_a.split()[:3] == ["a", "no", "-"] and f"istiod to serve root {new['id']}" in row_a
        gates = json.loads(s.op("root", "status", "--json"))["gates"]
        assert [(g["phase"], g["ready"], g["clusters"][0]["name"]) for g in gates] == [
            ("activate", False, "a"),
            ("retire", False, "a"),
        ]
        row, _ = days_left_column(s.op("cluster", "list"), "a")
        assert row["INSTALLED"] == "1" and row["SERVED"] == "1" and row["ISTIOD ROOTS"] == roots[0]["id"][:8]
        assert row["REPORT AGE"].endswith("s")
        activated = s.op("root", "activate", new["id"], "--force")
        assert activated.startswith(f"root {new['id']} activated: it signs") and "CERTIFICATE" not in activated
        assert "\nstatus:    active\n" in activated
        with s.http() as http:
            entries = http.get("/v1/audit", params={"limit": 1000}, headers={"Authorization": f"Bearer {admin_token}"})
            [entry] = [e for e in entries.json()["items"] if e["action"] == "root.activate"]
            assert entry["details"]["forced"] is True and entry["details"]["lagging"] == ["a"]
        table = s.op("root", "list")
        assert table.splitlines()[0].split() == ["ID", "STATUS", "NOT", "AFTER"]
        assert f"{roots[0]['id']}  trusted" in table and f"{new['id']}  active" in table
        refused = cli("root", "retire", roots[0]["id"], "--data-dir", str(d))
        assert refused.returncode == 1 and "(409)" in refused.stderr and "a" in refused.stderr
        refused = cli("root", "retire", roots[0]["id"], "--force", "--data-dir", str(d))  # a holds one under it
        assert refused.returncode == 1 and "Conflict (409)" in refused.stderr and ": a" in refused.stderr
        # MESHBRIDGE_ADMIN_TOKEN is given explicitly: it beats the D/admin-token default (as MESHBRIDGE_URL does)
        wrong = cli("cluster", "list", "--data-dir", str(d), env={"MESHBRIDGE_ADMIN_TOKEN": admin_token + "x"})
        assert wrong.returncode == 1 and "(401)" in wrong.stderr
        assert ok(
            "cluster",
            "list",
            "--url",
            s.url,
            "--ca-bundle",
            str(d / "root-cert.pem"),
            env={"MESHBRIDGE_ADMIN_TOKEN": admin_token},
        ).startswith("NAME")
    log = s.log.read_text()
    assert admin_token not in log and added["bootstrap_token"] not in log and "PRIVATE KEY" not in log
    assert json.loads(ok("audit", "verify", "--data-dir", str(d), "--json"))["ok"] is True
    down = cli(
        "cluster",
        "list",
        "--url",
        s.url,
        "--token-file",
        str(d / "admin-token"),
        "--ca-bundle",
        str(d / "root-cert.pem"),
    )
    assert down.returncode == 3 and "cannot reach" in down.stderr


def test_init_and_serve_on_postgresql(tmp_path: Path, pg_server: PgServer) -> None:
    url = pg_server.create_database(f"cli_{tmp_path.name.lower().replace('-', '_')}")
    d = tmp_path / "ca"
    assert json.loads(ok("init", "--data-dir", str(d), "--database-url", url, "--json"))["database"] == "postgresql"
    assert not (d / "meshbridge.db").exists()
    assert json.loads((d / "ca.json").read_text())["database_url"] == url  # serve needs only --data-dir
    again = cli("init", "--data-dir", str(tmp_path / "other"), "--database-url", url)
    assert again.returncode == 2 and "already has a root" in again.stderr  # the database holds a CA already
    for s in serve(d):
        s.op("cluster", "add", "a", "--trust-domain", "a.mesh")
        row, _ = days_left_column(s.op("cluster", "list"), "a")
        assert row["STATUS"] == "pending" and row["DESIRED"] == "0"
    # the five of init and cluster add, and serve recording its names (server_names.protect, issue 10)
    assert "intact: 6 entries" in ok("audit", "verify", "--data-dir", str(d))


# --------------------------------------------------------------------------------- root key types
@pytest.mark.parametrize("key_type", ["ecdsa-p384", "rsa-3072", "rsa-4096"])
def test_init_for_each_root_key_type(tmp_path: Path, key_type: str) -> None:
    d = tmp_path / "ca"
    ok("init", "--data-dir", str(d), "--key-type", key_type, env={"MESHBRIDGE_CA_KEY_PASSPHRASE": "from env"})
    assert not (d / "key-passphrase").exists()
    pem = (d / "root-cert.pem").read_text()
    root = x509.load_pem_x509_certificate(pem.encode())
    key = root.public_key()
    if key_type.startswith("ecdsa"):
        assert isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == "secp384r1"
    else:
        assert isinstance(key, rsa.RSAPublicKey) and key.key_size == int(key_type[4:])
    assert isinstance(root.signature_hash_algorithm, hashes.SHA256)
    assert pkilint_errors(pem, f"{key_type} root") == []
    [key_file] = list((d / "roots").glob("*.key.pem"))
    assert mode(key_file) == 0o600
    assert key_file.read_text().startswith("-----BEGIN ENCRYPTED PRIVATE KEY-----")
    serialization.load_pem_private_key(key_file.read_bytes(), password=b"from env")  # encrypted with it
    bad = cli("init", "--data-dir", str(tmp_path / "other"), "--key-type", "rsa-2048")
    assert bad.returncode == 2 and "accepted" in bad.stderr


# --------------------------------------------------------------------------------- importing a PKI
def _ca(
    subject: str,
    *,
    issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None,
    pathlen: int | None,
    key: ec.EllipticCurvePrivateKey | None = None,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = key or ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Example Corp"),
            x509.NameAttribute(NameOID.COMMON_NAME, subject),
        ]
    )
    issuer_name, signing_key = (issuer[0].subject, issuer[1]) if issuer else (name, key)
    now = datetime.now(UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=3000))
        .add_extension(x509.BasicConstraints(ca=True, path_length=pathlen), critical=True)
        .add_extension(x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    if issuer:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer[1].public_key()), critical=False
        )
    return builder.sign(signing_key, hashes.SHA256()), key


def _place(d: Path, name: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> tuple[Path, str]:
    (d / "imported").mkdir(parents=True, exist_ok=True, mode=0o700)
    (d / "imported" / f"{name}.key.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(IMPORT_PASSPHRASE.encode()),
        )
    )
    cert_path = d.parent / f"{name}.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert_path, f"file:imported/{name}.key.pem"


ENV = {"MESHBRIDGE_CA_KEY_PASSPHRASE": IMPORT_PASSPHRASE}


def test_import_an_existing_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    d = tmp_path / "ca"
    cert, key = _ca("Example Root", issuer=None, pathlen=None)
    cert_path, ref = _place(d, "root", cert, key)
    ok("init", "--data-dir", str(d), "--import-cert", str(cert_path), "--import-key-ref", ref, env=ENV)
    assert (d / "root-cert.pem").read_bytes() == cert.public_bytes(serialization.Encoding.PEM)
    from ca_server import runtime

    monkeypatch.setenv("MESHBRIDGE_CA_KEY_PASSPHRASE", IMPORT_PASSPHRASE)
    authority = runtime.build_authority(d)
    made = authority.create_cluster(name="a", trust_domain="a.mesh", gateway=None, actor="test")
    done = authority.enroll(
        cluster_name="a", bootstrap_token=made.bootstrap_token, csr_pem=pki.make_csr(pki.new_key(), "a")
    )
    chain = x509.load_pem_x509_certificates(done.issued.bundle.cert_chain.encode())
    assert chain[-1] == cert and len(chain) == 2
    (tmp_path / "leaf.pem").write_text(done.issued.bundle.ca_cert)
    res = openssl_verify(tmp_path / "leaf.pem", cafile=d / "root-cert.pem")
    assert res.ok, res.output


def test_import_an_issuing_ca_below_an_offline_root_and_serve(tmp_path: Path) -> None:
    offline, offline_key = _ca("Example Offline Root", issuer=None, pathlen=None)
    issuing, issuing_key = _ca("Example Mesh Issuing CA", issuer=(offline, offline_key), pathlen=1)
    d = tmp_path / "ca"
    cert_path, ref = _place(d, "issuing", issuing, issuing_key)
    chain_path = tmp_path / "offline.pem"
    chain_path.write_bytes(offline.public_bytes(serialization.Encoding.PEM))

    # refused: no chain up to a self-signed root; a key that is not the certificate's
    no_chain = cli("init", "--data-dir", str(d), "--import-cert", str(cert_path), "--import-key-ref", ref, env=ENV)
    assert no_chain.returncode == 2 and "self-signed root" in no_chain.stderr
    _, wrong_ref = _place(d, "other", *_ca("Other", issuer=None, pathlen=None))
    wrong = cli(
        "init",
        "--data-dir",
        str(d),
        "--import-cert",
        str(cert_path),
        "--import-chain",
        str(chain_path),
        "--import-key-ref",
        wrong_ref,
        env=ENV,
    )
    assert wrong.returncode == 2 and "does not match" in wrong.stderr
    assert not (d / "root-cert.pem").exists() and not (d / "admin-token").exists()

    ok(
        "init",
        "--data-dir",
        str(d),
        "--import-cert",
        str(cert_path),
        "--import-chain",
        str(chain_path),
        "--import-key-ref",
        ref,
        env=ENV,
    )
    # the trust anchor is the offline root; the issuing CA signs
    assert x509.load_pem_x509_certificates((d / "root-cert.pem").read_bytes()) == [offline]
    for s in serve(d, env=ENV):
        added = json.loads(s.op("cluster", "add", "a", "--trust-domain", "a.mesh", "--json"))
        with s.http() as http:  # the server's own certificate chains through the issuing CA
            r = http.post(
                "/v1/enroll",
                json={
                    "cluster": "a",
                    "bootstrap_token": added["bootstrap_token"],
                    "csr": pki.make_csr(pki.new_key(), "a"),
                },
            )
            assert r.status_code == 201, r.text
            bundle = r.json()["bundle"]
            crl = http.get("/v1/crl").content
        chain = x509.load_pem_x509_certificates(bundle["cert-chain.pem"].encode())
        assert chain[1:] == [issuing, offline]
        assert bundle["root-cert.pem"] == (d / "root-cert.pem").read_text()
        assert x509.load_der_x509_crl(crl).is_signature_valid(issuing_key.public_key())
        for name, text in {
            "leaf.pem": bundle["ca-cert.pem"],
            "chain.pem": bundle["cert-chain.pem"],
            "root.pem": bundle["root-cert.pem"],
            "crl.pem": bundle["crl.pem"],
        }.items():
            (tmp_path / name).write_text(text)
        res = openssl_verify(tmp_path / "leaf.pem", cafile=tmp_path / "root.pem", untrusted=tmp_path / "chain.pem")
        assert res.ok, res.output
        assert "active" in s.op("cluster", "list")


def test_a_pathlen_zero_issuing_ca_is_refused(tmp_path: Path) -> None:
    offline, offline_key = _ca("Example Offline Root", issuer=None, pathlen=None)
    issuing, issuing_key = _ca("Example Issuing CA", issuer=(offline, offline_key), pathlen=0)
    d = tmp_path / "ca"
    cert_path, ref = _place(d, "issuing", issuing, issuing_key)
    chain_path = tmp_path / "offline.pem"
    chain_path.write_bytes(offline.public_bytes(serialization.Encoding.PEM))
    r = cli(
        "init",
        "--data-dir",
        str(d),
        "--import-cert",
        str(cert_path),
        "--import-chain",
        str(chain_path),
        "--import-key-ref",
        ref,
        env=ENV,
    )
    assert r.returncode == 2 and "pathLenConstraint 0" in r.stderr
    assert not (d / "ca.json").exists() and not (d / "admin-token").exists()
    # an offline root that leaves no room below the issuing CA is refused too
    tight, tight_key = _ca("Tight Root", issuer=None, pathlen=1)
    issuing2, issuing2_key = _ca("Issuing 2", issuer=(tight, tight_key), pathlen=None)
    d2 = tmp_path / "ca2"
    cert2, ref2 = _place(d2, "issuing", issuing2, issuing2_key)
    chain2 = tmp_path / "tight.pem"
    chain2.write_bytes(tight.public_bytes(serialization.Encoding.PEM))
    r = cli(
        "init",
        "--data-dir",
        str(d2),
        "--import-cert",
        str(cert2),
        "--import-chain",
        str(chain2),
        "--import-key-ref",
        ref2,
        env=ENV,
    )
    assert r.returncode == 2 and "certificate 1" in r.stderr
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate")
    r = cli(
        "init", "--data-dir", str(tmp_path / "ca3"), "--import-cert", str(garbage), "--import-key-ref", ref, env=ENV
    )
    assert r.returncode == 2 and "Traceback" not in r.stderr


def test_an_imported_ca_must_be_able_to_sign_crls() -> None:
    from ca_server.core.errors import InvalidInput
    from ca_server.core.importca import check_importable_ca
    from ca_server.core.keytypes import LocalKeySigner

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "No CRL Root")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(True, False, False, False, False, True, False, False, False), critical=True)
        .sign(key, hashes.SHA256())
    )
    with pytest.raises(InvalidInput, match="cRLSign"):
        check_importable_ca(cert, [], LocalKeySigner(key), now=now)
    good, good_key = _ca("Good Root", issuer=None, pathlen=None)
    check_importable_ca(good, [], LocalKeySigner(good_key), now=now)
    with pytest.raises(InvalidInput, match="not valid now"):
        check_importable_ca(good, [], LocalKeySigner(good_key), now=now + timedelta(days=4000))


def test_workload_cert_lifetime_reaches_the_retirement_gate(tmp_path: Path) -> None:
    from ca_server.cli import parse_duration

    assert [parse_duration(t) for t in ("24h", "1h30m", "2d", "3600", "90S")] == [
        timedelta(hours=24),
        timedelta(minutes=90),
        timedelta(days=2),
        timedelta(hours=1),
        timedelta(seconds=90),
    ]
    d = tmp_path / "ca"
    ok("init", "--data-dir", str(d))
    for bad, why in [("forever", "is not a duration"), ("1h 30m", "is not a duration"), ("91d", "from 1s to 90d")]:
        r = cli("serve", "--data-dir", str(d), "--workload-cert-lifetime", bad)
        assert r.returncode == 2 and why in r.stderr, (bad, r.stderr)
    for s in serve(d, "--workload-cert-lifetime", "90m"):
        status = json.loads(s.op("root", "status", "--json"))
        assert (status["workload_cert_lifetime_s"], status["margin_s"], status["gates"]) == (5400, 540, [])
        assert "lifetime 1h30m + margin 9m: activating waits 1h39m after every istiod serves" in s.op("root", "status")


def test_token_create_list_revoke_round_trip(tmp_path: Path) -> None:
    """Issue 14: on-call gets a viewer token, the init admin token is rotated; the server's log and
    the token list never show a secret."""
    d = tmp_path / "ca"
    ok("init", "--data-dir", str(d))
    initial = (d / "admin-token").read_text().strip()
    for s in serve(d):
        made = json.loads(s.op("token", "create", "oncall", "--role", "viewer", "--expires-in", "30d", "--json"))
        assert made["role"] == "viewer" and made["state"] == "live" and made["token"].startswith("mbadmin.")
        expires = datetime.strptime(made["expires_at"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
        assert timedelta(days=29.9) < expires - datetime.now(UTC) <= timedelta(days=30)
        viewer_file = tmp_path / "viewer-token"
        viewer_file.write_text(made["token"] + "\n")
        as_viewer = ("--data-dir", str(d), "--token-file", str(viewer_file))
        assert "NAME" in ok("cluster", "list", *as_viewer)
        refused = cli("cluster", "add", "a", *as_viewer)
        assert refused.returncode == 1 and "(403)" in refused.stderr and "needs the admin role" in refused.stderr
        # the init token is the only admin token: revoking it is refused with what to do instead
        last = cli("token", "revoke", "initial", "--data-dir", str(d))
        assert last.returncode == 1 and "last admin token" in last.stderr and "token create" in last.stderr
        s.op("token", "create", "ops", "--role", "admin", "--token-out", str(tmp_path / "ops-token"))
        assert mode(tmp_path / "ops-token") == 0o600
        as_ops = ("--data-dir", str(d), "--token-file", str(tmp_path / "ops-token"))
        revoked = json.loads(ok("token", "revoke", "initial", *as_ops, "--json"))
        assert revoked["name"] == "initial" and revoked["state"] == "revoked"
        gone = cli("cluster", "list", "--data-dir", str(d))  # D/admin-token is the revoked one now
        assert gone.returncode == 1 and "(401)" in gone.stderr
        listing = ok("token", "list", *as_ops)
        rows = {line.split()[1]: line.split() for line in listing.splitlines()[1:]}
        assert rows["initial"][2:4] == ["admin", "revoked"] and rows["oncall"][2:4] == ["viewer", "live"]
        assert rows["ops"][2:4] == ["admin", "live"]
        ops = (tmp_path / "ops-token").read_text().strip()
        log = s.log.read_text()
        for token in (initial, made["token"], ops):
            secret = token.split(".")[2]
            assert secret not in listing and secret not in log
    bad = cli("token", "create", "x", "--role", "viewer", "--expires-in", "10s", "--data-dir", str(d))
    assert bad.returncode == 2 and "60s to 3650d" in bad.stderr
