"""`dns_capture_problem`: whether a parsed meshConfig turns on the DNS capture `dns.mode: istio`
relies on (ISTIO_META_DNS_CAPTURE in defaultConfig.proxyMetadata, read by pilot-agent with Go's
strconv.ParseBool)."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from cluster_agent.dnsmode import dns_capture_problem, dns_check_for


def mesh(proxy_metadata: Any) -> dict[str, Any]:
    return {
        "trustDomain": "b.mesh",
        "defaultConfig": {"discoveryAddress": "istiod:15012", "proxyMetadata": proxy_metadata},
    }


@pytest.mark.parametrize("value", ["true", "True", "TRUE", "1", "t", "T"])
def test_capture_on(value: str) -> None:
    assert dns_capture_problem(mesh({"ISTIO_META_DNS_CAPTURE": value, "OTHER": "x"})) is None


def test_capture_on_as_istio_documents_it() -> None:
    mesh_yaml = """
defaultConfig:
  proxyMetadata:
    ISTIO_META_DNS_CAPTURE: "true"
"""
    assert dns_capture_problem(yaml.safe_load(mesh_yaml)) is None


@pytest.mark.parametrize(
    ("mesh_config", "expected"),
    [
        ({}, "meshConfig has no defaultConfig, so Istio's DNS capture is off"),
        ({"defaultConfig": "x"}, "meshConfig.defaultConfig is not a mapping"),
        ({"defaultConfig": {}}, "meshConfig.defaultConfig.proxyMetadata is not set"),
        (mesh(["ISTIO_META_DNS_CAPTURE"]), "meshConfig.defaultConfig.proxyMetadata is not a mapping"),
        (mesh({"ISTIO_META_DNS_AUTO_ALLOCATE": "true"}), "proxyMetadata has no ISTIO_META_DNS_CAPTURE"),
        (mesh({"ISTIO_META_DNS_CAPTURE": "false"}), "is 'false', which turns DNS capture off"),
        (mesh({"ISTIO_META_DNS_CAPTURE": "yes"}), "is 'yes', which is not a boolean, which pilot-agent reads as false"),
        (
            mesh({"ISTIO_META_DNS_CAPTURE": True}),
            "is True, not a string; proxyMetadata values are strings, so quote it",
        ),
    ],
)
def test_what_is_missing_is_named(mesh_config: dict[str, Any], expected: str) -> None:
    problem = dns_capture_problem(mesh_config)
    assert problem is not None and expected in problem
    if "quote it" not in problem:
        assert 'meshConfig.defaultConfig.proxyMetadata.ISTIO_META_DNS_CAPTURE: "true"' in problem
        assert "dns.mode coredns" in problem


def test_the_agent_checks_dns_capture_only_in_istio_mode() -> None:
    check = dns_check_for("istio")
    assert check is not None and check({}) is not None  # an empty meshConfig does not capture DNS
    assert dns_check_for("coredns") is None and dns_check_for("none") is None
