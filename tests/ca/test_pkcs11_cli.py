"""`meshbridge-ca init --key-backend pkcs11` end to end: the root key is made inside a SoftHSM2
token, never leaves it, and `serve` signs intermediates with it; backups carry only its reference."""

from __future__ import annotations

import json
import subprocess
import tarfile
from pathlib import Path

from cryptography import x509

from ca_server.backup import backup
from cluster_agent import pki
from tests.ca.softhsm import SoftHSM
from tests.support.replicas import CLI, Replica, admin_token


def test_pkcs11_root_signs_through_the_token(tmp_path: Path) -> None:
    hsm = SoftHSM.shared()
    token = hsm.new_token()
    pin_file = tmp_path / "pin"
    pin_file.write_text(token.pin + "\n")
    d = tmp_path / "ca"
    r = subprocess.run(
        [
            *CLI,
            "init",
            "--data-dir",
            str(d),
            "--key-backend",
            "pkcs11",
            "--pkcs11-module",
            token.module_path,
            "--pkcs11-token",
            token.label,
            "--pkcs11-pin-file",
            str(pin_file),
            "--json",
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert "PKCS#11" in out["key"] and token.label in out["key"] and token.pin not in r.stdout + r.stderr
    settings = (d / "ca.json").read_text()
    assert token.pin not in settings and json.loads(settings)["key_backend"] == "pkcs11"
    assert not (d / "roots").exists() or not any((d / "roots").iterdir())  # no key file anywhere
    assert not (d / "key-passphrase").exists()

    replica = Replica(d).start()
    try:
        with replica.client(admin_token(d)) as c:
            boot = c.post("/v1/clusters", json={"name": "h", "trust_domain": "h.mesh"}).json()["bootstrap_token"]
            key = pki.new_key()
            resp = c.post("/v1/enroll", json={"cluster": "h", "bootstrap_token": boot, "csr": pki.make_csr(key, "h")})
            assert resp.status_code == 201, resp.text
            assert c.get("/readyz").status_code == 200
        inter = x509.load_pem_x509_certificate(resp.json()["bundle"]["ca-cert.pem"].encode())
        root = x509.load_pem_x509_certificate((d / "root-cert.pem").read_bytes())
        inter.verify_directly_issued_by(root)
    finally:
        replica.stop()

    archive = tmp_path / "b.tar.gz"
    manifest = backup(d, archive)
    assert [ref.startswith("pkcs11:") for ref in manifest["key_refs"]] == [True]
    with tarfile.open(archive) as tar:
        assert not [n for n in tar.getnames() if n.startswith("keys/")]
