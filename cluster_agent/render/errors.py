"""Errors raised by the pure renderers.

    RenderError(ValueError)      the inputs cannot be rendered into valid objects
    ├── BundleError              cacerts material istiod would refuse (what `Verify` checks)
    ├── CorefileError            a Corefile whose meshbridge markers are broken or that already
    │                            serves the suffix outside them
    └── VipRangeExhausted        more imported names than addresses in dns.vip_range

Bad data from the CA service about one import or peer is not an error: that item is left out and
a warning is returned with the rendered objects, so one bad entry never stops the rest.
"""

from __future__ import annotations

__all__ = ["BundleError", "CorefileError", "RenderError", "VipRangeExhausted"]


class RenderError(ValueError):
    """The inputs cannot be rendered."""


class BundleError(RenderError):
    """The CA bundle would be refused by istiod or break workload chains in Envoy."""


class CorefileError(RenderError):
    """The Corefile cannot take the meshbridge server block safely."""


class VipRangeExhausted(RenderError):
    """dns.vip_range has fewer usable addresses than imported names."""
