"""Where rendered objects go, as the agent's pass sees it: the applier protocol, what an apply
reports, and which live objects an applier may prune.

Two appliers implement it: ``kube.KubeApplier`` (a live cluster) and ``output.DirectoryWriter``
(YAML files, render mode).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from cluster_agent.meshcheck import MeshFacts
from cluster_agent.render.objects import CLUSTER_LABEL, MANAGED_BY, MANAGED_BY_LABEL, Manifest

__all__ = ["Applier", "ApplyReport", "managed_by_labels", "prune_selector"]


@dataclass
class ApplyReport:
    created: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    pruned: list[str] = field(default_factory=list)

    @property
    def writes(self) -> int:
        return len(self.created) + len(self.updated) + len(self.pruned)

    def summary(self) -> str:
        return (
            f"{len(self.created)} created, {len(self.updated)} updated, {len(self.unchanged)} unchanged, "
            f"{len(self.pruned)} pruned"
        )


class Applier(Protocol):
    """Where rendered objects go: a live cluster (kube.KubeApplier) or a directory (render mode)."""

    def apply(self, objects: list[Manifest], *, corefile_block: str | None) -> ApplyReport: ...

    def apply_cacerts(self, secret: Manifest) -> ApplyReport: ...

    def current_corefile(self) -> str | None: ...

    def service_exports(self) -> list[dict[str, Any]]: ...

    def mesh_facts(self) -> MeshFacts | None:
        """What `meshcheck.check_mesh` checks; None where there is no cluster to read (render mode)."""
        ...


def managed_by_labels() -> dict[str, str]:
    """The label every object meshbridge writes carries (the renderers' `managed_labels` start with it)."""
    return {MANAGED_BY_LABEL: MANAGED_BY}


def prune_selector(cluster: str) -> dict[str, str]:
    """The label selector of the live objects an applier may prune: those the renderers labelled as
    meshbridge's for this cluster (`render.objects.managed_labels`), never anything else."""
    return {**managed_by_labels(), CLUSTER_LABEL: cluster}
