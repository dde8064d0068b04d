"""Shared pieces of every rendered object: labels, metadata, names, file names, YAML text."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping
from typing import Any

import yaml

__all__ = [
    "CLUSTER_LABEL",
    "COMPONENT_LABEL",
    "MANAGED_BY",
    "MANAGED_BY_LABEL",
    "Manifest",
    "file_name",
    "managed_labels",
    "metadata",
    "object_names",
    "sort_objects",
    "to_yaml",
]

Manifest = dict[str, Any]

MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
MANAGED_BY = "meshbridge"
CLUSTER_LABEL = "meshbridge.io/cluster"
COMPONENT_LABEL = "meshbridge.io/component"
SOURCE_CLUSTER_LABEL = "meshbridge.io/source-cluster"
NAME_ANNOTATION = "meshbridge.io/name"

_NOT_NAME_CHARS = re.compile(r"[^a-z0-9-]")


def managed_labels(cluster: str, component: str, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    labels = {MANAGED_BY_LABEL: MANAGED_BY, CLUSTER_LABEL: cluster, COMPONENT_LABEL: component}
    if extra:
        labels.update(extra)
    return labels


def metadata(
    name: str,
    namespace: str,
    labels: Mapping[str, str],
    annotations: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": namespace, "labels": dict(labels)}
    if annotations:
        meta["annotations"] = dict(annotations)
    return meta


def _short_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def object_names(keys: Iterable[str], *, prefix: str, max_len: int = 253) -> dict[str, str]:
    """Map each key (e.g. 'ratings.bookinfo') to a DNS-1123 object name such as
    'meshbridge-import-ratings-bookinfo'.

    Readable where possible; a key whose readable form is too long or collides with another key's
    (`a-b.c` and `a.b-c` both read `a-b-c`) gets a hash of the key appended instead, so names are
    unique within the set and depend only on the set.
    """
    readable: dict[str, str] = {}
    users: dict[str, int] = {}
    for key in sorted(set(keys)):
        base = f"{prefix}-{_NOT_NAME_CHARS.sub('-', key.lower())}".strip("-")
        readable[key] = base
        users[base] = users.get(base, 0) + 1
    names: dict[str, str] = {}
    for key, base in readable.items():
        if len(base) <= max_len and users[base] == 1:
            names[key] = base
        else:
            names[key] = f"{base[: max_len - 9].rstrip('-')}-{_short_hash(key)}"
    return names


def file_name(obj: Mapping[str, Any]) -> str:
    """`<kind>-<namespace>-<name>.yaml`, kind lowercased (API.md, "Rendered and applied objects")."""
    meta = obj["metadata"]
    namespace = meta.get("namespace")
    kind = str(obj["kind"]).lower()
    if namespace:
        return f"{kind}-{namespace}-{meta['name']}.yaml"
    return f"{kind}-{meta['name']}.yaml"


def _object_key(obj: Mapping[str, Any]) -> tuple[str, str, str, str]:
    meta = obj["metadata"]
    return (str(obj["kind"]), str(meta.get("namespace", "")), str(meta["name"]), str(obj["apiVersion"]))


def sort_objects(objects: Iterable[Manifest]) -> list[Manifest]:
    return sorted(objects, key=_object_key)


# libyaml's emitter when PyYAML has it: the pure-Python one needs seconds per thousand objects.
_BaseDumper: type[yaml.SafeDumper] = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


class _Dumper(_BaseDumper):  # type: ignore[valid-type,misc]
    """Safe dumper that writes multi-line strings (Corefile, PEM) as literal blocks for review."""


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    if "\n" in value:
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|")
    return dumper.represent_scalar("tag:yaml.org,2002:str", value)


_Dumper.add_representer(str, _represent_str)


def to_yaml(obj: Mapping[str, Any]) -> str:
    """Deterministic YAML for one object (sorted keys, literal blocks for multi-line strings)."""
    return yaml.dump(dict(obj), Dumper=_Dumper, sort_keys=True, default_flow_style=False, width=1 << 16)
