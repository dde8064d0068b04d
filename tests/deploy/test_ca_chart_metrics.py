"""The CA chart's metrics scraping: /metrics answers only a token, so the chart hands the service
a scraper's own token (never the admin token) and the ServiceMonitor scrapes with it."""

from __future__ import annotations

from typing import Any

from tests.deploy.test_charts import CA, helm, only, render

__all__ = ["helm"]  # the module-scoped fixture, shared with test_charts.py


def test_ca_without_a_metrics_token_mounts_none(helm: Any) -> None:
    docs = render(helm, CA)
    (ca,) = only(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
    assert not [a for a in ca["args"] if a.startswith("--metrics-token-file")]
    assert not [d for d in docs if d["kind"] == "ServiceMonitor"]


def test_ca_metrics_token_and_service_monitor(helm: Any) -> None:
    docs = render(
        helm,
        CA,
        "--set",
        "metrics.tokenSecret=ca-metrics",
        "--set",
        "metrics.serviceMonitor.enabled=true",
        "--set",
        "metrics.serviceMonitor.tlsConfig.serverName=mb-meshbridge-ca.meshbridge.svc",
    )
    pod = only(docs, "Deployment")["spec"]["template"]["spec"]
    (ca,) = pod["containers"]
    assert "--metrics-token-file=/etc/meshbridge/metrics/token" in ca["args"]
    mount = next(m for m in ca["volumeMounts"] if m["name"] == "metrics-token")
    assert mount == {"name": "metrics-token", "mountPath": "/etc/meshbridge/metrics", "readOnly": True}
    volume = next(v for v in pod["volumes"] if v["name"] == "metrics-token")
    assert volume["secret"]["secretName"] == "ca-metrics"
    assert volume["secret"]["items"] == [{"key": "token", "path": "token"}]
    (endpoint,) = only(docs, "ServiceMonitor")["spec"]["endpoints"]
    assert endpoint["port"] == "https" and endpoint["scheme"] == "https" and endpoint["path"] == "/metrics"
    assert endpoint["bearerTokenSecret"] == {"name": "ca-metrics", "key": "token"}
    assert endpoint["tlsConfig"] == {"serverName": "mb-meshbridge-ca.meshbridge.svc"}


def test_ca_service_monitor_needs_the_scrapers_token(helm: Any) -> None:
    r = helm("template", "mb", str(CA), "--set", "metrics.serviceMonitor.enabled=true", check=False)
    assert r.returncode != 0 and "metrics.tokenSecret" in r.stderr
