"""Per-tenant and per-key limits, kept in Redis so every gateway replica enforces the same:
a request rate per tenant and per key, and a token budget per tenant (token buckets, one
atomic Lua call per request), and a ceiling on max_tokens per request.

Each tenant's limits are the gateway's defaults (settings) unless the admin set others for
it (PUT /admin/tenants/{tenant}/limits); 0 means unlimited. A request over a rate is
refused with 429 and Retry-After before it costs anything. Tokens are charged after the
generation, by what it really used: the budget may go below zero, and the tenant's next
requests wait until it has refilled (429 with Retry-After), at most one minute's worth.
"""

from __future__ import annotations

import math
from dataclasses import asdict, fields

import redis.asyncio as aioredis
from pydantic import Field
from pydantic.dataclasses import dataclass

from services.common.errors import ResourceExhausted
from services.common.keys import key

# KEYS: the tenant's limits hash, its request bucket, the key's request bucket, its token
# bucket. ARGV: "admit" or "charge", tokens to charge, then the defaults in LIMIT_FIELDS
# order. Buckets are hashes {level, at}; time is Redis's, the same for every replica.
_LIMITS = """
local names = {'requests_per_second', 'requests_burst', 'key_requests_per_second',
               'key_requests_burst', 'tokens_per_minute', 'max_tokens_per_request'}
local stored = redis.call('HMGET', KEYS[1], unpack(names))
local limit = {}
for i, name in ipairs(names) do limit[name] = tonumber(stored[i] or ARGV[2 + i]) end
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6

local function level(bucket, rate, burst)
  local saved = redis.call('HMGET', bucket, 'level', 'at')
  local value = tonumber(saved[1]) or burst
  local at = tonumber(saved[2]) or now
  return math.min(burst, value + math.max(0, now - at) * rate)
end
local function save(bucket, value, rate, burst)
  redis.call('HSET', bucket, 'level', tostring(value), 'at', tostring(now))
  redis.call('PEXPIRE', bucket, math.ceil(2000 * burst / rate) + 1000)
end

local tpm = limit.tokens_per_minute
if ARGV[1] == 'charge' then
  if tpm > 0 then
    local rate = tpm / 60
    save(KEYS[4], math.max(-tpm, level(KEYS[4], rate, tpm) - tonumber(ARGV[2])), rate, tpm)
  end
  return {1, 0, 0}
end
local buckets = {
  {KEYS[2], limit.requests_per_second, math.max(1, limit.requests_burst), 1},
  {KEYS[3], limit.key_requests_per_second, math.max(1, limit.key_requests_burst), 1},
  {KEYS[4], tpm / 60, tpm, 0},
}
local wait, which, levels = 0, 0, {}
for i, b in ipairs(buckets) do
  if b[2] > 0 then
    levels[i] = level(b[1], b[2], b[3])
    -- a request costs 1; the token budget only has to be above zero
    local need = math.max(b[4], 1e-9)
    if levels[i] < need and (need - levels[i]) / b[2] > wait then
      wait, which = (need - levels[i]) / b[2], i
    end
  end
end
if wait > 0 then
  return {0, tostring(wait), which}
end
for i, b in ipairs(buckets) do
  if b[2] > 0 then save(b[1], levels[i] - b[4], b[2], b[3]) end
end
return {1, 0, limit.max_tokens_per_request}
"""


# The admit script's buckets, in order (it names the one that refused by its number).
_BUCKET_NAMES = {1: "tenant's request rate", 2: "key's request rate", 3: "tenant's token budget"}
_TOKEN_BUCKET = 3


@dataclass(frozen=True)
class TenantLimits:
    """A tenant's limits; 0 is unlimited. Bursts are bucket sizes (requests at once)."""

    requests_per_second: float = Field(default=0.0, ge=0, le=1e9)
    requests_burst: int = Field(default=0, ge=0, le=10**9)
    key_requests_per_second: float = Field(default=0.0, ge=0, le=1e9)
    key_requests_burst: int = Field(default=0, ge=0, le=10**9)
    tokens_per_minute: int = Field(default=0, ge=0, le=10**9)
    max_tokens_per_request: int = Field(default=0, ge=0, le=10**9)


LIMIT_FIELDS = [f.name for f in fields(TenantLimits)]


class RateLimiter:
    def __init__(self, redis: aioredis.Redis, defaults: TenantLimits) -> None:
        self._redis = redis
        self._defaults = defaults
        self._script = redis.register_script(_LIMITS)

    @staticmethod
    def _keys(tenant: str, key_id: str) -> list[str]:
        return [
            key(tenant, "limits"),
            key(tenant, "bucket", "requests"),
            key(tenant, "bucket", "key", key_id[:16]),
            key(tenant, "bucket", "tokens"),
        ]

    def _args(self, mode: str, tokens: int = 0) -> list:
        return [mode, tokens, *(getattr(self._defaults, n) for n in LIMIT_FIELDS)]

    async def admit(self, tenant: str, key_id: str) -> int:
        """Take one request from the tenant's and the key's rates, if the token budget is
        above zero; else ResourceExhausted with the seconds to wait. Returns the tenant's
        max_tokens per request (0: no ceiling of its own)."""
        allowed, wait, detail = await self._script(
            keys=self._keys(tenant, key_id), args=self._args("admit")
        )
        if not allowed:
            seconds = float(wait)
            budget = int(detail) == _TOKEN_BUCKET
            raise ResourceExhausted(
                f"this {_BUCKET_NAMES[int(detail)]} is used up; retry in {seconds:.2f} s",
                reason="TOKEN_BUDGET_EXHAUSTED" if budget else "RATE_LIMITED",
                retry_after_seconds=str(max(1, math.ceil(seconds))),
            )
        return int(detail)

    async def charge(self, tenant: str, key_id: str, tokens: int) -> None:
        """Take the tokens a generation used from the tenant's budget."""
        if tokens > 0:
            await self._script(keys=self._keys(tenant, key_id), args=self._args("charge", tokens))

    async def get(self, tenant: str) -> TenantLimits:
        stored = await self._redis.hgetall(key(tenant, "limits"))
        values = asdict(self._defaults)
        for name, value in stored.items():
            name = name.decode() if isinstance(name, bytes) else name
            if name in values:
                values[name] = type(values[name])(float(value))
        return TenantLimits(**values)

    async def set(self, tenant: str, limits: TenantLimits) -> None:
        await self._redis.hset(key(tenant, "limits"), mapping=asdict(limits))
