"""Validation of untrusted identifiers: each pattern and limit is written here, once.

Tenant and adapter names end up in Redis keys and in adapter-store paths, so they are
checked against one strict pattern before use: no separators, no dots at the start,
nothing that could climb out of a directory.
"""

from __future__ import annotations

import re

from services.common.errors import InvalidArgument
from services.common.keys import PLATFORM

# Tenants and experiment keys: 1-63 lowercase letters, digits, '-' or '_'.
LOWERCASE_ID = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
# Adapter names, and the experiment and variant labels events and candidates carry.
LABEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
# Ids a client chooses for what it sends: analytics batch ids, candidate and item ids.
RECORD_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
# Longest experiment unit id (an end user's id), wherever one is accepted.
MAX_UNIT_ID = 256


def check_lowercase_id(value: str, what: str, reason: str) -> str:
    if not LOWERCASE_ID.fullmatch(value or ""):
        raise InvalidArgument(
            f"invalid {what} {value!r}: use 1-63 lowercase letters, digits, '-' or '_'",
            reason=reason,
        )
    return value


def check_tenant(value: str) -> str:
    return check_lowercase_id(value, "tenant id", "INVALID_TENANT")


def check_adapter_name(value: str) -> str:
    if not LABEL.fullmatch(value or "") or ".." in value:
        raise InvalidArgument(
            f"invalid adapter name {value!r}: use 1-128 letters, digits, '.', '-' or '_'",
            reason="INVALID_ADAPTER_NAME",
        )
    return value


def owner_of(tenant: str, shared: bool) -> str:
    """The registry owner a request names: the tenant, or the platform for shared adapters."""
    if shared:
        if tenant:
            raise InvalidArgument(
                "a shared adapter belongs to the platform: leave tenant empty",
                reason="SHARED_WITH_TENANT",
            )
        return PLATFORM
    return check_tenant(tenant)
