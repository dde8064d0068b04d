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
* lightkube's exceptions are translated here, once (`kube_error`), into the agent's own
  (`errors.KubeError` and its kinds): every request leaves through `_call`, and only the functions
  under "lightkube's errors" ever see lightkube's.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import math
import os
import secrets
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import httpx2
from lightkube import ApiError, Client, KubeConfig
from lightkube.codecs import from_dict
from lightkube.core.exceptions import ConfigError as KubeConfigError
from lightkube.generic_resource import create_namespaced_resource
from lightkube.models.meta_v1 import ObjectMeta
from lightkube.resources.coordination_v1 import Lease
from lightkube.resources.core_v1 import ConfigMap, Pod, Secret, Service

from cluster_agent.apply import ApplyReport, managed_by_labels, prune_selector
from cluster_agent.config import END_TO_END, AgentConfig, ConfigError, EgressGatewayConfig, IngressGatewayConfig
from cluster_agent.errors import KubeConflict, KubeError, KubeForbidden, KubeNotFound, KubeRetryLater
from cluster_agent.mcs import CONSUMERS_ANNOTATION, ServicePortView, service_export_entry
from cluster_agent.meshcheck import MESH_KEY, GatewayFacts, MeshFacts, PodFacts, ServicePort
from cluster_agent.state import AgentState

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
    try:
        if kc.kubeconfig:
            return Client(
                KubeConfig.from_file(str(kc.kubeconfig)).get(context_name=kc.context), field_manager=kc.field_manager
            )
        return Client(field_manager=kc.field_manager)
    except (KubeConfigError, OSError) as exc:
        where = f"kubernetes.kubeconfig: {kc.kubeconfig}" if kc.kubeconfig else "kubernetes: in-cluster credentials"
        raise ConfigError(
            f"{where} cannot be used ({exc}); set kubernetes.kubeconfig (and context) or run "
            f"in a pod with a service account"
        ) from exc


# ------------------------------------------------------------------------------ lightkube's errors
def kube_error(exc: httpx2.HTTPError) -> KubeError:
    """The agent's error for a failed request, by the status of the answer (as kopf classifies them)."""
    if not isinstance(exc, httpx2.HTTPStatusError):
        return KubeRetryLater(f"Kubernetes API server unreachable: {type(exc).__name__}", status=None)
    answer = exc.response
    status = exc.status.code if isinstance(exc, ApiError) and exc.status.code else answer.status_code
    detail = exc.status.message if isinstance(exc, ApiError) and exc.status.message else answer.reason_phrase
    message = f"Kubernetes API server answered {status}: {detail}"
    if status == 429 or status >= 500:
        return KubeRetryLater(message, status=status, delay=_retry_after(answer.headers.get("retry-after", "")))
    kind = {403: KubeForbidden, 404: KubeNotFound, 409: KubeConflict}.get(status, KubeError)
    return kind(message, status=status)


def _retry_after(header: str) -> float | None:
    try:
        seconds = float(header)
    except ValueError:  # absent, or an HTTP date
        return None
    return seconds if math.isfinite(seconds) else None


def retry_transient(fn: Callable[[], T], *, attempts: int = 5) -> T:
    """``fn()``, again after a 409 (it re-reads what it writes) or a 429 (after the server's
    Retry-After, at most 5 s), up to ``attempts`` times. Runs inside `_call`: what it gives up on
    is still lightkube's error."""
    for i in range(attempts):
        try:
            return fn()
        except ApiError as exc:
            delay = _retry_delay(kube_error(exc), i)
            if delay is None or i == attempts - 1:
                raise
            time.sleep(delay)
    raise AssertionError("unreachable")


def _retry_delay(error: KubeError, attempt: int) -> float | None:
    if isinstance(error, KubeConflict):
        return 0.05 * (attempt + 1)
    if isinstance(error, KubeRetryLater) and error.status == 429:
        return 1.0 if error.delay is None else min(max(error.delay, 0.05), 5.0)
    return None


def _call(fn: Callable[[], T], *, retry: bool = False) -> T:
    """``fn()``, lightkube requests (through `retry_transient` when ``retry``); a failure leaves as
    the agent's KubeError."""
    try:
        return retry_transient(fn) if retry else fn()
    except httpx2.HTTPError as exc:
        raise kube_error(exc) from exc


def _get_or_none(client: Client, resource: Any, name: str, namespace: str) -> Any:
    """The object, or None when it does not exist; for use inside `_call`."""
    try:
        return client.get(resource, name, namespace=namespace)
    except ApiError as exc:
        if isinstance(kube_error(exc), KubeNotFound):
            return None
        raise


# ------------------------------------------------------------------------------ the applier
class KubeApplier:
    def __init__(self, client: Client, config: AgentConfig) -> None:
        self.client = client
        self.config = config
        self.fm = config.kubernetes.field_manager
        self.write_calls = 0
        self._warned: set[str] = set()  # ServiceExport warnings already logged

    # ------------------------------------------------------------------ reads the reconciler needs
    def current_corefile(self) -> str | None:
        dns = self.config.dns
        if dns.mode != "coredns":
            return None
        cm = _call(lambda: _get_or_none(self.client, ConfigMap, dns.coredns_configmap, dns.coredns_namespace))
        return None if cm is None else (cm.data or {}).get(dns.corefile_key)

    def configmap_data(self, namespace: str, name: str) -> dict[str, str] | None:
        """A ConfigMap's data, or None when it does not exist (istiod's outputs, see served.py)."""
        cm = _call(lambda: _get_or_none(self.client, ConfigMap, name, namespace))
        return None if cm is None else dict(cm.data or {})

    def service_exports(self) -> list[dict[str, Any]]:
        """MCS ServiceExport objects, where the CRD is installed, as export entries
        (`mcs.service_export_entry`: ports classified as Istio does, consumers from an annotation).
        A port that cannot cross is logged once, naming the ServiceExport and the port."""
        try:
            items = _call(lambda: list(self.client.list(ServiceExport, namespace="*")))
        except (KubeForbidden, KubeNotFound):  # not allowed, or the CRD is not installed
            return []
        out = []
        for se in items:
            meta = se.metadata
            assert meta is not None and meta.name and meta.namespace
            try:
                ports = self._service_ports(meta.name, meta.namespace)
            except (KubeForbidden, KubeNotFound):
                continue
            consumers = (meta.annotations or {}).get(CONSUMERS_ANNOTATION, "")
            entry, warnings = service_export_entry(meta.name, meta.namespace, consumers, ports)
            for warning in warnings:
                if warning not in self._warned:
                    self._warned.add(warning)
                    log.warning(warning, extra={"cluster": self.config.cluster})
            if entry is not None:
                out.append(entry)
        return out

    def _service_ports(self, name: str, namespace: str) -> list[ServicePortView]:
        svc = _call(lambda: self.client.get(Service, name, namespace=namespace))
        return [
            ServicePortView(p.port, p.name, p.protocol, p.appProtocol)
            for p in (svc.spec.ports if svc.spec and svc.spec.ports else [])
        ]

    # ------------------------------------------------------------------ Istio's preconditions
    def mesh_facts(self) -> MeshFacts:
        """What `meshcheck.check_mesh` judges: the configured gateways' Services and running pods,
        istiod's mesh ConfigMap and running pods, and Secret cacerts' age and roots. A read RBAC
        refuses is listed in `unreadable` instead of failing the pass."""
        istio = self.config.istio
        unreadable: list[str] = []
        configured: list[IngressGatewayConfig | EgressGatewayConfig] = [istio.ingress_gateway]
        configured += self.config.egress_gateways()
        gateways = {(istio.gateway_namespace(g), g.service): self._gateway_facts(g, unreadable) for g in configured}
        ns = istio.namespace
        cm = self._read(
            f"configmap {ns}/{istio.mesh_configmap}",
            unreadable,
            lambda: _get_or_none(self.client, ConfigMap, istio.mesh_configmap, ns),
        )
        istiod = self._read(f"pods {ns}", unreadable, lambda: self._running_pods(ns, istio.istiod_selector)) or ()
        cacerts = self._read(
            f"secret {ns}/cacerts", unreadable, lambda: _get_or_none(self.client, Secret, "cacerts", ns)
        )
        root = (cacerts.data or {}).get("root-cert.pem") if cacerts is not None else None
        return MeshFacts(
            gateways=gateways,
            mesh_config=None if cm is None else (cm.data or {}).get(MESH_KEY, ""),
            istiod_pods=istiod,
            cacerts_created=cacerts.metadata.creationTimestamp if cacerts is not None and cacerts.metadata else None,
            cacerts_root_cert=base64.b64decode(root).decode() if root is not None else None,
            now=datetime.now(UTC),
            unreadable=tuple(dict.fromkeys(unreadable)),
        )

    def _gateway_facts(
        self, gateway: IngressGatewayConfig | EgressGatewayConfig, unreadable: list[str]
    ) -> GatewayFacts:
        ns = self.config.istio.gateway_namespace(gateway)
        ports = self._read(
            f"service {ns}/{gateway.service}", unreadable, lambda: self._gateway_ports(ns, gateway.service)
        )
        pods = self._read(f"pods {ns}", unreadable, lambda: self._running_pods(ns, gateway.selector))
        return GatewayFacts(ports, pods or ())

    @staticmethod
    def _read(what: str, unreadable: list[str], fn: Callable[[], T]) -> T | None:
        try:
            return _call(fn)
        except KubeForbidden:
            unreadable.append(what)
            return None

    def _gateway_ports(self, namespace: str, name: str) -> tuple[ServicePort, ...] | None:
        svc = _get_or_none(self.client, Service, name, namespace)
        if svc is None:
            return None
        return tuple(
            ServicePort(p.port, p.targetPort, p.name or "")
            for p in (svc.spec.ports if svc.spec and svc.spec.ports else [])
        )

    def _running_pods(self, namespace: str, selector: dict[str, str]) -> tuple[PodFacts, ...]:
        """The pods ``selector`` selects that run or are about to (not finished, not being deleted)."""
        pods = self.client.list(Pod, namespace=namespace, labels=dict(selector))
        return tuple(
            _pod_facts(p)
            for p in pods
            if p.metadata is not None
            and p.metadata.deletionTimestamp is None
            and (p.status is None or p.status.phase not in ("Succeeded", "Failed"))
        )

    # ------------------------------------------------------------------ apply
    def apply(self, objects: list[dict[str, Any]], *, corefile_block: str | None = None) -> ApplyReport:
        report = ApplyReport()
        dns = self.config.dns
        wanted: dict[str, dict[str, Any]] = {}
        for obj in objects:
            meta = obj["metadata"]
            k = _key(obj["kind"], meta["namespace"], meta["name"])
            if (
                obj["kind"] == "ConfigMap"
                and meta["name"] == dns.coredns_configmap
                and meta["namespace"] == dns.coredns_namespace
            ):
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
            self._prune(k)
            report.pruned.append(k)
        return report

    def apply_cacerts(self, secret: dict[str, Any]) -> ApplyReport:
        """Replace Secret `cacerts` alone (its CRLs re-signed in a pass without the CA service); no
        other object is touched or pruned."""
        report = ApplyReport()
        self._replace_cacerts(secret, report)
        return report

    def _apply_one(self, resource: Any) -> None:
        _call(lambda: self.client.apply(resource, field_manager=self.fm, force=True), retry=True)

    def _prune(self, k: str) -> None:
        kind_l, ns, name = k.split("/", 2)
        kind = next(kk for kk in RESOURCES if kk.lower() == kind_l)
        try:
            _call(lambda: self.client.delete(RESOURCES[kind], name, namespace=ns))
            self.write_calls += 1
        except KubeNotFound:
            pass

    def _namespaces(self, kind: str) -> set[str]:
        """Where the agent writes objects of ``kind``: istio.namespace and the CoreDNS namespace;
        AuthorizationPolicies also in the ingress gateway's namespace (`IstioContext.policy_namespace`)."""
        istio = self.config.istio
        namespaces = {istio.namespace, self.config.dns.coredns_namespace}
        if kind == "AuthorizationPolicy":
            namespaces.add(istio.gateway_namespace(istio.ingress_gateway))
            # end-to-end exports' workload policies sit beside their workloads
            namespaces.update(e.namespace for e in self.config.exports if e.mode == END_TO_END)
        return namespaces

    def _live_managed(self) -> dict[str, str]:
        """What this agent applied earlier (`prune_selector`), by key, with its content hash."""
        out: dict[str, str] = {}
        for kind, res in RESOURCES.items():
            for ns in sorted(self._namespaces(kind)):
                try:
                    items = self._list_managed(res, ns)
                except (KubeForbidden, KubeNotFound):
                    continue
                for item in items:
                    meta = item.metadata
                    assert meta is not None and meta.name
                    out[_key(kind, ns, meta.name)] = (meta.annotations or {}).get(HASH_ANNOTATION, "")
        return out

    def _list_managed(self, resource: Any, namespace: str) -> list[Any]:
        labels: dict[str, Any] = prune_selector(self.config.cluster)
        return _call(lambda: list(self.client.list(resource, namespace=namespace, labels=labels)), retry=True)

    def _replace_cacerts(self, obj: dict[str, Any], report: ApplyReport) -> None:
        ns, name = obj["metadata"]["namespace"], obj["metadata"]["name"]
        k = _key("Secret", ns, name)

        def attempt() -> None:
            live = _get_or_none(self.client, Secret, name, ns)
            if live is None:
                self.client.create(from_dict(obj))
                self.write_calls += 1
                report.created.append(k)
                return
            if (live.data or {}) == obj.get("data", {}) and ((live.metadata and live.metadata.labels) or {}) == obj[
                "metadata"
            ].get("labels", {}):
                report.unchanged.append(k)
                return
            body = from_dict(obj)
            assert body.metadata is not None and live.metadata is not None
            body.metadata.resourceVersion = live.metadata.resourceVersion  # guarded: a concurrent write → 409
            self.client.replace(body)
            self.write_calls += 1
            report.updated.append(k)

        _call(attempt, retry=True)

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

        _call(attempt, retry=True)


# ------------------------------------------------------------------------------ state and leadership
class SecretStateStore:
    """The agent's state in a Secret of the Istio namespace (agent token, intermediate key, VIPs)."""

    def __init__(self, client: Client, namespace: str, name: str = "meshbridge-agent-state") -> None:
        self.client = client
        self.namespace = namespace
        self.name = name

    def __repr__(self) -> str:
        return f"SecretStateStore({self.namespace}/{self.name})"

    def load(self) -> AgentState:
        s = _call(lambda: _get_or_none(self.client, Secret, self.name, self.namespace))
        raw = (s.data or {}).get("state.json") if s is not None else None
        return AgentState.from_json(base64.b64decode(raw).decode()) if raw else AgentState()

    def save(self, state: AgentState) -> None:
        data = {"state.json": base64.b64encode(state.to_json().encode()).decode()}

        def attempt() -> None:
            live = _get_or_none(self.client, Secret, self.name, self.namespace)
            if live is None:
                self.client.create(
                    Secret(
                        metadata=ObjectMeta(name=self.name, namespace=self.namespace, labels=managed_by_labels()),
                        type="Opaque",
                        data=data,
                    )
                )
                return
            live.data = data
            self.client.replace(live)

        _call(attempt, retry=True)


class LeaseElector:
    """coordination.k8s.io Lease: only the holder reconciles, so two replicas never fight."""

    def __init__(
        self,
        client: Client,
        namespace: str,
        *,
        name: str = "meshbridge-agent",
        identity: str | None = None,
        duration: int = 30,
    ) -> None:
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
        except KubeError as exc:
            log.warning("lease: %s", exc)
            return False

    def _try_acquire(self) -> bool:
        from lightkube.models.coordination_v1 import LeaseSpec

        now = datetime.now(UTC)
        lease = _call(lambda: _get_or_none(self.client, Lease, self.name, self.namespace))
        if lease is None:
            created = Lease(
                metadata=ObjectMeta(name=self.name, namespace=self.namespace, labels=managed_by_labels()),
                spec=LeaseSpec(
                    holderIdentity=self.identity, leaseDurationSeconds=self.duration, acquireTime=now, renewTime=now
                ),
            )
            _call(lambda: self.client.create(created))
            self._held_until = time.monotonic() + self.duration
            return True
        spec = lease.spec
        assert spec is not None
        expired = (
            spec.renewTime is None
            or spec.renewTime + timedelta(seconds=spec.leaseDurationSeconds or self.duration) < now
        )
        if spec.holderIdentity != self.identity and not expired:
            return False
        if spec.holderIdentity != self.identity:
            spec.acquireTime = now
            spec.leaseTransitions = (spec.leaseTransitions or 0) + 1
        spec.holderIdentity = self.identity
        spec.renewTime = now
        spec.leaseDurationSeconds = self.duration
        try:
            _call(lambda: self.client.replace(lease))  # resourceVersion from the read: a race's loser gets 409
        except KubeConflict:
            return False
        self._held_until = time.monotonic() + self.duration
        return True


def _pod_facts(pod: Any) -> PodFacts:
    """A pod as `meshcheck` sees it: its service account (`serviceAccountName`, else the deprecated
    `serviceAccount`, else `default`, as the ServiceAccount admission plugin fills it), start time,
    the environment of istiod's `discovery` container (or of its first container) and the named
    container ports."""
    spec = pod.spec
    containers = list(spec.containers or []) if spec is not None else []
    main = next((c for c in containers if c.name == "discovery"), containers[0] if containers else None)
    env = {e.name: (e.value if e.valueFrom is None else None) for e in ((main.env or []) if main else [])}
    ports = {p.name: p.containerPort for c in containers for p in (c.ports or []) if p.name}
    return PodFacts(
        name=pod.metadata.name,
        service_account=(spec.serviceAccountName or spec.serviceAccount or "default") if spec else "default",
        started_at=pod.status.startTime if pod.status is not None else None,
        env=env,
        container_ports=ports,
    )
