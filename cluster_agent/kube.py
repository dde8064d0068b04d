"""The only module that touches lightkube: applying to a live cluster.

* Server-side apply with one field manager for every object meshbridge owns; an object is
  re-applied only when its content hash (annotation ``meshbridge.io/content-hash``) differs, so a
  reconcile with nothing changed makes zero write calls.
* Pruning lists only objects labelled ``app.kubernetes.io/managed-by: meshbridge``: nothing the
  agent did not create is touched.
* ``cacerts`` is replaced in one write guarded by resourceVersion (create when absent), never
  patched key by key; the ``coredns`` ConfigMap gets only its Corefile key replaced, the same way.
* A 409 conflict is retried a few times with a fresh read; a 429 (the API server pushing back,
  e.g. "storage is (re)initializing" while a new CRD's cache fills) after its Retry-After, as
  client-go does.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from lightkube import ApiError, Client, KubeConfig
from lightkube.codecs import from_dict
from lightkube.generic_resource import create_namespaced_resource
from lightkube.models.meta_v1 import ObjectMeta
from lightkube.resources.coordination_v1 import Lease
from lightkube.resources.core_v1 import ConfigMap, Secret, Service

from cluster_agent.config import AgentConfig
from cluster_agent.reconcile import MANAGED_BY, ApplyReport
from cluster_agent.state import AgentState
from meshbridge_wire.protocols import Protocol, parse_protocol

log = logging.getLogger("meshbridge.agent.kube")

HASH_ANNOTATION = "meshbridge.io/content-hash"
T = TypeVar("T")

ISTIO_KINDS = {
    "Gateway": ("networking.istio.io", "v1", "gateways"),
    "VirtualService": ("networking.istio.io", "v1", "virtualservices"),
    "ServiceEntry": ("networking.istio.io", "v1", "serviceentries"),
    "DestinationRule": ("networking.istio.io", "v1", "destinationrules"),
    "AuthorizationPolicy": ("security.istio.io", "v1", "authorizationpolicies"),
}
GENERIC = {kind: create_namespaced_resource(g, v, kind, plural) for kind, (g, v, plural) in ISTIO_KINDS.items()}
ServiceExport = create_namespaced_resource("multicluster.x-k8s.io", "v1alpha1", "ServiceExport", "serviceexports")
RESOURCES: dict[str, Any] = {**GENERIC, "ConfigMap": ConfigMap, "Secret": Secret}


def content_hash(obj: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:32]


def _key(kind: str, ns: str, name: str) -> str:
    return f"{kind.lower()}/{ns}/{name}"


def make_client(config: AgentConfig) -> Client:
    kc = config.kubernetes
    if kc.kubeconfig:
        return Client(KubeConfig.from_file(str(kc.kubeconfig)).get(context_name=kc.context),
                      field_manager=kc.field_manager)
    return Client(field_manager=kc.field_manager)


def retry_transient(fn: Callable[[], T], *, attempts: int = 5) -> T:
    """``fn()``, again after a 409 (it re-reads what it writes) or a 429 (after the server's
    Retry-After, at most 5 s), up to ``attempts`` times."""
    for i in range(attempts):
        try:
            return fn()
        except ApiError as exc:
            if exc.status.code not in (409, 429) or i == attempts - 1:
                raise
            time.sleep(_retry_delay(exc, i))
    raise AssertionError("unreachable")


def _retry_delay(exc: ApiError, attempt: int) -> float:
    if exc.status.code == 429:
        header = exc.response.headers.get("retry-after", "") if exc.response is not None else ""
        try:
            return min(max(float(header), 0.05), 5.0)
        except ValueError:
            return 1.0
    return 0.05 * (attempt + 1)


class KubeApplier:
    def __init__(self, client: Client, config: AgentConfig) -> None:
        self.client = client
        self.config = config
        self.fm = config.kubernetes.field_manager
        self.write_calls = 0

    # ------------------------------------------------------------------ reads the reconciler needs
    def current_corefile(self) -> str | None:
        if self.config.dns.mode != "coredns":
            return None
        try:
            cm = self.client.get(ConfigMap, self.config.dns.coredns_configmap,
                                 namespace=self.config.dns.coredns_namespace)
        except ApiError as exc:
            if exc.status.code == 404:
                return None
            raise
        return (cm.data or {}).get(self.config.dns.corefile_key)

    def service_exports(self) -> list[dict[str, Any]]:
        """MCS ServiceExport objects, where the CRD is installed (consumers from an annotation)."""
        try:
            items = list(self.client.list(ServiceExport, namespace="*"))
        except ApiError as exc:
            if exc.status.code in (403, 404):
                return []
            raise
        except Exception as exc:  # the CRD is not installed: the server answers 404 without a Status body
            if getattr(getattr(exc, "response", None), "status_code", None) in (403, 404):
                return []
            raise
        out = []
        for se in items:
            meta = se.metadata
            assert meta is not None and meta.name and meta.namespace
            consumers = sorted(c.strip() for c in (meta.annotations or {}).get("meshbridge.io/consumers", "")
                               .split(",") if c.strip())
            try:
                svc = self.client.get(Service, meta.name, namespace=meta.namespace)
            except ApiError:
                continue
            ports = [{"number": p.port, "protocol": _port_protocol(p.appProtocol or p.name or "")}
                     for p in (svc.spec.ports if svc.spec and svc.spec.ports else [])]
            if ports:
                out.append({"name": f"{meta.name}.{meta.namespace}", "namespace": meta.namespace,
                            "service": meta.name, "ports": ports, "consumers": consumers})
        return out

    # ------------------------------------------------------------------ apply
    def apply(self, objects: list[dict[str, Any]], *, corefile_block: str | None = None) -> ApplyReport:
        report = ApplyReport()
        dns = self.config.dns
        wanted: dict[str, dict[str, Any]] = {}
        for obj in objects:
            meta = obj["metadata"]
            k = _key(obj["kind"], meta["namespace"], meta["name"])
            if obj["kind"] == "ConfigMap" and meta["name"] == dns.coredns_configmap \
                    and meta["namespace"] == dns.coredns_namespace:
                self._merge_corefile(obj, report)
                continue
            if obj["kind"] == "Secret" and meta["name"] == "cacerts":
                self._replace_cacerts(obj, report)
                wanted[k] = obj
                continue
            wanted[k] = obj
        live = self._live_managed()
        for k, obj in sorted(wanted.items()):
            if obj["kind"] == "Secret" and obj["metadata"]["name"] == "cacerts":
                continue
            h = content_hash(obj)
            if live.get(k) == h:
                report.unchanged.append(k)
                continue
            body = json.loads(json.dumps(obj))
            body["metadata"].setdefault("annotations", {})[HASH_ANNOTATION] = h
            self._apply_one(from_dict(body))
            self.write_calls += 1
            (report.updated if k in live else report.created).append(k)
        for k in sorted(set(live) - set(wanted)):
            kind_l, ns, name = k.split("/", 2)
            kind = next(kk for kk in RESOURCES if kk.lower() == kind_l)
            try:
                self.client.delete(RESOURCES[kind], name, namespace=ns)
                self.write_calls += 1
            except ApiError as exc:
                if exc.status.code != 404:
                    raise
            report.pruned.append(k)
        return report

    def _apply_one(self, resource: Any) -> None:
        def attempt() -> None:
            self.client.apply(resource, field_manager=self.fm, force=True)

        retry_transient(attempt)

    def _namespaces(self) -> set[str]:
        return {self.config.istio.namespace, self.config.dns.coredns_namespace}

    def _list(self, res: Any, ns: str, labels: dict[str, Any]) -> list[Any]:
        return retry_transient(lambda: list(self.client.list(res, namespace=ns, labels=labels)))

    def _live_managed(self) -> dict[str, str]:
        out: dict[str, str] = {}
        labels: dict[str, Any] = dict(MANAGED_BY)
        labels["meshbridge.io/cluster"] = self.config.cluster
        for kind, res in RESOURCES.items():
            for ns in sorted(self._namespaces()):
                try:
                    for item in self._list(res, ns, labels):
                        meta = item.metadata
                        assert meta is not None and meta.name
                        out[_key(kind, ns, meta.name)] = (meta.annotations or {}).get(HASH_ANNOTATION, "")
                except ApiError as exc:
                    if exc.status.code not in (403, 404):
                        raise
        return out

    def _replace_cacerts(self, obj: dict[str, Any], report: ApplyReport) -> None:
        ns, name = obj["metadata"]["namespace"], obj["metadata"]["name"]
        k = _key("Secret", ns, name)

        def attempt() -> None:
            try:
                live = self.client.get(Secret, name, namespace=ns)
            except ApiError as exc:
                if exc.status.code != 404:
                    raise
                self.client.create(from_dict(obj))
                self.write_calls += 1
                report.created.append(k)
                return
            if (live.data or {}) == obj.get("data", {}) and ((live.metadata and live.metadata.labels) or {}) \
                    == obj["metadata"].get("labels", {}):
                report.unchanged.append(k)
                return
            body = from_dict(obj)
            assert body.metadata is not None and live.metadata is not None
            body.metadata.resourceVersion = live.metadata.resourceVersion  # guarded: a concurrent write → 409
            self.client.replace(body)
            self.write_calls += 1
            report.updated.append(k)

        retry_transient(attempt)

    def _merge_corefile(self, obj: dict[str, Any], report: ApplyReport) -> None:
        dns = self.config.dns
        k = _key("ConfigMap", dns.coredns_namespace, dns.coredns_configmap)
        new_corefile = obj["data"][dns.corefile_key]

        def attempt() -> None:
            live = self.client.get(ConfigMap, dns.coredns_configmap, namespace=dns.coredns_namespace)
            data = dict(live.data or {})
            if data.get(dns.corefile_key) == new_corefile:
                report.unchanged.append(k)
                return
            data[dns.corefile_key] = new_corefile
            live.data = data  # every other key and field stays as it was; resourceVersion guards the write
            self.client.replace(live)
            self.write_calls += 1
            report.updated.append(k)

        retry_transient(attempt)


class SecretStateStore:
    """The agent's state in a Secret of the Istio namespace (agent token, intermediate key, VIPs)."""

    def __init__(self, client: Client, namespace: str, name: str = "meshbridge-agent-state") -> None:
        self.client = client
        self.namespace = namespace
        self.name = name

    def __repr__(self) -> str:
        return f"SecretStateStore({self.namespace}/{self.name})"

    def load(self) -> AgentState:
        import base64

        try:
            s = self.client.get(Secret, self.name, namespace=self.namespace)
        except ApiError as exc:
            if exc.status.code == 404:
                return AgentState()
            raise
        raw = (s.data or {}).get("state.json")
        return AgentState.from_json(base64.b64decode(raw).decode()) if raw else AgentState()

    def save(self, state: AgentState) -> None:
        import base64

        data = {"state.json": base64.b64encode(state.to_json().encode()).decode()}

        def attempt() -> None:
            try:
                live = self.client.get(Secret, self.name, namespace=self.namespace)
            except ApiError as exc:
                if exc.status.code != 404:
                    raise
                self.client.create(Secret(metadata=ObjectMeta(name=self.name, namespace=self.namespace,
                                                              labels=dict(MANAGED_BY)), type="Opaque", data=data))
                return
            live.data = data
            self.client.replace(live)

        retry_transient(attempt)


class LeaseElector:
    """coordination.k8s.io Lease: only the holder reconciles, so two replicas never fight."""

    def __init__(self, client: Client, namespace: str, *, name: str = "meshbridge-agent",
                 identity: str | None = None, duration: int = 30) -> None:
        self.client = client
        self.namespace = namespace
        self.name = name
        self.identity = identity or f"{os.environ.get('HOSTNAME', 'agent')}-{secrets.token_hex(4)}"
        self.duration = duration
        self._held_until = 0.0

    def is_leader(self) -> bool:
        if time.monotonic() < self._held_until - self.duration / 3:
            return True
        try:
            return self._try_acquire()
        except ApiError as exc:
            log.warning("lease: %s", exc.status.message)
            return False

    def _try_acquire(self) -> bool:
        from lightkube.models.coordination_v1 import LeaseSpec

        now = datetime.now(UTC)
        try:
            lease = self.client.get(Lease, self.name, namespace=self.namespace)
        except ApiError as exc:
            if exc.status.code != 404:
                raise
            self.client.create(Lease(metadata=ObjectMeta(name=self.name, namespace=self.namespace,
                                                         labels=dict(MANAGED_BY)),
                                     spec=LeaseSpec(holderIdentity=self.identity,
                                                    leaseDurationSeconds=self.duration,
                                                    acquireTime=now, renewTime=now)))
            self._held_until = time.monotonic() + self.duration
            return True
        spec = lease.spec
        assert spec is not None
        expired = spec.renewTime is None or spec.renewTime + timedelta(
            seconds=spec.leaseDurationSeconds or self.duration) < now
        if spec.holderIdentity != self.identity and not expired:
            return False
        if spec.holderIdentity != self.identity:
            spec.acquireTime = now
            spec.leaseTransitions = (spec.leaseTransitions or 0) + 1
        spec.holderIdentity = self.identity
        spec.renewTime = now
        spec.leaseDurationSeconds = self.duration
        try:
            self.client.replace(lease)  # resourceVersion from the read: the loser of a race gets 409
        except ApiError as exc:
            if exc.status.code == 409:
                return False
            raise
        self._held_until = time.monotonic() + self.duration
        return True


def _port_protocol(app_protocol_or_name: str) -> Protocol:
    """A Service port's protocol from its appProtocol or its name's prefix (`grpc-web` reads as GRPC)."""
    protocol = parse_protocol(app_protocol_or_name.split("-")[0])
    return protocol if protocol is not None and protocol is not Protocol.GRPC_WEB else Protocol.HTTP
