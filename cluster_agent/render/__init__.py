"""Pure renderers: configuration and desired state in, Kubernetes manifests (plain dicts) out.

No I/O and no clock (a `now` is passed in where time matters); output is deterministic and
sorted, so rendering twice gives the same bytes and a diff shows only what changed.

    render_all(config, imports=…, peers=…, vips=…)   everything, as a RenderResult
    istio        Gateways, VirtualServices, ServiceEntries, DestinationRules, AuthorizationPolicies
    coredns      the `<suffix>:53` server block and Corefile merging
    cacerts      Secret `cacerts`, istiod's bundle check, the intermediates' CRLs
    vip          stable VIPs and ConfigMap `meshbridge-state`
    objects      labels, names, `file_name`, `to_yaml`
"""

from cluster_agent.render.cacerts import (
    check_cacerts_bundle,
    compose_ca_crl,
    crl_needs_resign,
    render_cacerts_secret,
    sign_intermediate_crl,
)
from cluster_agent.render.compose import CacertsResult, RenderResult, render_all, render_cacerts
from cluster_agent.render.coredns import (
    merge_into_corefile,
    render_coredns_configmaps,
    render_server_block,
)
from cluster_agent.render.errors import BundleError, CorefileError, RenderError, VipRangeExhausted
from cluster_agent.render.objects import MANAGED_BY, MANAGED_BY_LABEL, file_name, to_yaml
from cluster_agent.render.vip import allocate_vips, render_state_configmap, vips_from_state

__all__ = [
    "MANAGED_BY",
    "MANAGED_BY_LABEL",
    "BundleError",
    "CacertsResult",
    "CorefileError",
    "RenderError",
    "RenderResult",
    "VipRangeExhausted",
    "allocate_vips",
    "check_cacerts_bundle",
    "compose_ca_crl",
    "crl_needs_resign",
    "file_name",
    "merge_into_corefile",
    "render_all",
    "render_cacerts",
    "render_cacerts_secret",
    "render_coredns_configmaps",
    "render_server_block",
    "render_state_configmap",
    "sign_intermediate_crl",
    "to_yaml",
    "vips_from_state",
]
