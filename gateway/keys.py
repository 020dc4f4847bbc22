"""Tenants and their API keys, owned by the gateway and kept in Redis.

Every key lives under the {_platform} hash tag, so each multi-key write is one MULTI (or
script) on one Redis Cluster slot. API keys are stored only as their sha256 digest: a
Redis dump yields no usable key. An unsalted fast hash is enough because the keys are 256
random bits, not passwords.

A key has a scope: `tenant` (the tenant's whole API), `reviewer` (the tenant's review
queue only) or `metrics` (the Prometheus scrape, no tenant). The admin key is not stored
here: it comes from the environment.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import time
from dataclasses import dataclass
from enum import StrEnum

import redis.asyncio as aioredis

from services.common.errors import AlreadyExists, InvalidArgument, NotFound
from services.common.keys import PLATFORM, key, tenants_index
from services.common.names import check_tenant

API_KEY_PREFIX = "lpx_"
_KEY_ID = re.compile(r"^[0-9a-f]{64}$")

# Deletes a key's index entry only if it belongs to the tenant, so one tenant's admin
# call can never revoke another tenant's key.
_REVOKE = """
local owner = redis.call('GET', KEYS[1])
if owner and string.sub(owner, -string.len(ARGV[1]) - 1) == ':' .. ARGV[1] then
  redis.call('DEL', KEYS[1])
  redis.call('SREM', KEYS[2], ARGV[2])
  return 1
end
return 0
"""


class Scope(StrEnum):
    TENANT = "tenant"
    REVIEWER = "reviewer"
    METRICS = "metrics"


@dataclass(frozen=True)
class Caller:
    """Who a presented key is: its tenant (PLATFORM for a metrics key), scope and id; and,
    once admitted, the tenant's ceiling on max_tokens per request (0: none of its own)."""

    tenant: str
    scope: Scope
    key_id: str
    max_tokens_per_request: int = 0


@dataclass(frozen=True, order=True)
class Tenant:
    tenant: str
    created: int  # unix seconds


@dataclass(frozen=True)
class IssuedKey:
    tenant: str
    api_key: str  # shown once; only key_id is stored
    key_id: str  # sha256 hex of api_key
    scope: Scope = Scope.TENANT


def parse_scope(value: str) -> Scope:
    try:
        return Scope(value)
    except ValueError:
        raise InvalidArgument(
            f"unknown key scope {value!r}; use one of {', '.join(Scope)}", reason="UNKNOWN_SCOPE"
        ) from None


def key_id(api_key: str) -> str:
    return hashlib.sha256(api_key.encode()).hexdigest()


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class TenantKeyStore:
    def __init__(self, redis: aioredis.Redis) -> None:
        self._redis = redis
        self._tenants = tenants_index()

    @staticmethod
    def _index(kid: str) -> str:
        return key(PLATFORM, "apikey", kid)

    @staticmethod
    def _tenant_keys(tenant: str) -> str:
        return key(PLATFORM, "apikeys", tenant)

    async def create_tenant(self, tenant: str) -> Tenant:
        check_tenant(tenant)
        created = int(time.time())
        if not await self._redis.hsetnx(self._tenants, tenant, created):
            raise AlreadyExists(
                f"tenant {tenant!r} already exists", reason="TENANT_EXISTS", tenant=tenant
            )
        return Tenant(tenant, created)

    async def list_tenants(self) -> list[Tenant]:
        entries = await self._redis.hgetall(self._tenants)
        return sorted(Tenant(_text(t), int(c)) for t, c in entries.items())

    async def tenant_exists(self, tenant: str) -> bool:
        return bool(await self._redis.hexists(self._tenants, tenant))

    async def require_tenant(self, tenant: str) -> None:
        if not await self.tenant_exists(tenant):
            raise NotFound(
                f"tenant {tenant!r} does not exist", reason="TENANT_NOT_FOUND", tenant=tenant
            )

    async def create_key(self, tenant: str, scope: Scope = Scope.TENANT) -> IssuedKey:
        """A tenant's key (scope tenant or reviewer), or a metrics key (tenant PLATFORM)."""
        if scope is Scope.METRICS:
            if tenant != PLATFORM:
                raise InvalidArgument(
                    "a metrics key belongs to no tenant", reason="SCOPE_NOT_FOR_TENANT"
                )
        else:
            await self.require_tenant(tenant)
        api_key = API_KEY_PREFIX + secrets.token_urlsafe(32)
        kid = key_id(api_key)
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.set(self._index(kid), f"{scope}:{tenant}")
            pipe.sadd(self._tenant_keys(tenant), kid)
            await pipe.execute()
        return IssuedKey(tenant, api_key, kid, scope)

    async def resolve(self, api_key: str) -> Caller | None:
        """Who an API key is, or None for an unknown or revoked key."""
        if not api_key:
            return None
        kid = key_id(api_key)
        value = await self._redis.get(self._index(kid))
        if value is None:
            return None
        scope, _, tenant = _text(value).partition(":")
        return Caller(tenant, Scope(scope), kid)

    async def list_key_ids(self, tenant: str) -> list[str]:
        if tenant != PLATFORM:
            await self.require_tenant(tenant)
        return sorted(_text(k) for k in await self._redis.smembers(self._tenant_keys(tenant)))

    async def revoke_key(self, tenant: str, kid: str) -> None:
        revoked = _KEY_ID.fullmatch(kid) and await self._redis.eval(
            _REVOKE, 2, self._index(kid), self._tenant_keys(tenant), tenant, kid
        )
        if not revoked:
            raise NotFound(f"tenant {tenant!r} has no API key {kid!r}", reason="API_KEY_NOT_FOUND")
