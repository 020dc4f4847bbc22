"""Redis key names: lp:{<tenant>}:<kind>:<id>...

The braces make <tenant> the Redis Cluster hash tag, so one tenant's keys share a slot and
multi-key operations on them stay legal on a cluster. Platform-wide keys use the tag
{_platform}, which no tenant can take (tenant ids cannot start with '_').
"""

from __future__ import annotations

PLATFORM = "_platform"


def key(tenant: str, kind: str, *parts: object) -> str:
    return ":".join(["lp", "{" + tenant + "}", kind, *(str(p) for p in parts)])
