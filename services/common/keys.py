"""Redis key names: lp:{<tenant>}:<kind>:<id>...

The braces make <tenant> the Redis Cluster hash tag, so one tenant's keys share a slot and
multi-key operations on them stay legal on a cluster. Platform-wide keys use the tag
{_platform}, which no tenant can take (tenant ids cannot start with '_').
"""

from __future__ import annotations

PLATFORM = "_platform"


def key(tenant: str, kind: str, *parts: object) -> str:
    return ":".join(["lp", "{" + tenant + "}", kind, *(str(p) for p in parts)])


# Adapter registry keys (written by inference; others may read, e.g. to check that an
# adapter a tenant names exists).
def adapter_index(owner: str) -> str:
    """Hash: adapter name -> current version."""
    return key(owner, "adapters")


def adapter_versions(owner: str, name: str) -> str:
    """Hash: version -> JSON record."""
    return key(owner, "adapter", name, "versions")


def tenants_index() -> str:
    """Hash: tenant -> created unix seconds (written by the gateway; others may read)."""
    return key(PLATFORM, "tenants")
