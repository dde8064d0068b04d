"""The CA chart gives every replica the same audit key from a Secret, outside the data volume."""

from __future__ import annotations

from typing import Any

from tests.deploy.test_charts import CA, CA_POSTGRES, helm, only, render

__all__ = ["helm"]  # the fixture, shared with test_charts.py

KEY_FILE = "/etc/meshbridge/audit-key/audit-key"


def key_wiring(docs: list[dict[str, Any]]) -> str:
    """The audit key Secret both containers read; asserts how they read it."""
    pod = only(docs, "Deployment")["spec"]["template"]["spec"]
    (volume,) = [v for v in pod["volumes"] if v["name"] == "audit-key"]
    for container in (*pod["initContainers"], *pod["containers"]):
        env = {e["name"]: e for e in container["env"]}
        assert env["MESHBRIDGE_AUDIT_KEY_FILE"] == {"name": "MESHBRIDGE_AUDIT_KEY_FILE", "value": KEY_FILE}
        (mount,) = [m for m in container["volumeMounts"] if m["name"] == "audit-key"]
        assert mount == {"name": "audit-key", "mountPath": "/etc/meshbridge/audit-key", "readOnly": True}
        assert not mount["mountPath"].startswith("/data")
    assert volume["secret"]["items"][0]["path"] == "audit-key"
    assert volume["secret"]["defaultMode"] == 0o440
    return str(volume["secret"]["secretName"])


def test_a_generated_audit_key_is_kept_and_mounted(helm: Any) -> None:
    docs = render(helm, CA)
    assert key_wiring(docs) == "mb-meshbridge-ca-audit-key"
    secret = only(docs, "Secret", "-audit-key")
    assert secret["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    assert len(secret["data"]["audit-key"]) >= 44  # 32+ characters, base64


def test_replicas_share_an_existing_audit_key_secret(helm: Any) -> None:
    docs = render(helm, CA, "--values", str(CA_POSTGRES))
    assert key_wiring(docs) == "meshbridge-ca-audit-key"
    assert not [d for d in docs if d["kind"] == "Secret"]


def test_no_audit_key_is_refused(helm: Any) -> None:
    r = helm("template", "mb", str(CA), "--set", "auditKey.generate=false", check=False)
    assert r.returncode != 0 and "auditKey" in r.stderr
