"""Audit details of a bounded size: what an agent sends is audited, but not at any length."""

from __future__ import annotations

import hashlib
import json
from typing import Any

AUDIT_DETAILS_LIMIT = 4096  # bytes of JSON


def capped(details: dict[str, Any], limit: int = AUDIT_DETAILS_LIMIT) -> dict[str, Any]:
    """``details`` when their JSON takes at most ``limit`` bytes; else its SHA-256, its size and
    the length of each list, mapping or string in it (what an auditor can still compare)."""
    text = json.dumps(details, sort_keys=True, default=str, separators=(",", ":")).encode()
    if len(text) <= limit:
        return details
    return {
        "digest": "sha256:" + hashlib.sha256(text).hexdigest(),
        "bytes": len(text),
        "counts": {k: len(v) for k, v in details.items() if isinstance(v, list | dict | str)},
    }
