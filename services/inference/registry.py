"""Adapter registry in Redis: which adapters each tenant has, their versions and metadata.

Keys (owner is a tenant id, or the platform tag for shared adapters):
  lp:{owner}:adapters                    hash  name -> current version
  lp:{owner}:adapter:<name>:versions     hash  version -> JSON record
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field

import redis.asyncio as aioredis

from services.common.errors import AlreadyExists, InvalidArgument, NotFound
from services.common.keys import PLATFORM, adapter_index, adapter_versions
from services.common.names import check_adapter_name, check_tenant
from services.common.paging import decode_page_token, encode_page_token

log = logging.getLogger(__name__)

# Allocates the version (max + 1 when 0 is asked) and makes it current, atomically.
_REGISTER = """
local version = tonumber(ARGV[2])
if version == 0 then
  version = 1
  for _, v in ipairs(redis.call('HKEYS', KEYS[1])) do
    if tonumber(v) >= version then version = tonumber(v) + 1 end
  end
elseif redis.call('HEXISTS', KEYS[1], version) == 1 then
  return -1
end
redis.call('HSET', KEYS[1], version, ARGV[3])
redis.call('HSET', KEYS[2], ARGV[1], version)
return version
"""


@dataclass
class AdapterRecord:
    owner: str  # tenant id, or PLATFORM for shared adapters
    name: str
    version: int
    sha256: str
    rank: int
    lora_alpha: float
    target_modules: list[str] = field(default_factory=list)
    size_bytes: int = 0
    created_at: float = 0.0

    @property
    def shared(self) -> bool:
        return self.owner == PLATFORM

    @property
    def cache_key(self) -> tuple[str, str, int]:
        return (self.owner, self.name, self.version)


class AdapterRegistry:
    def __init__(self, redis: aioredis.Redis) -> None:
        self._redis = redis
        self._register = redis.register_script(_REGISTER)

    async def register(self, record: AdapterRecord) -> AdapterRecord:
        """Record a new version and make it current. record.version 0 means 'next'."""
        body = asdict(record)
        del body["version"]
        body["created_at"] = record.created_at or time.time()
        version = await self._register(
            keys=[
                adapter_versions(record.owner, record.name),
                adapter_index(record.owner),
            ],
            args=[record.name, record.version, json.dumps(body)],
        )
        if version == -1:
            raise AlreadyExists(
                f"adapter {record.name!r} version {record.version} already exists",
                reason="ADAPTER_VERSION_EXISTS",
            )
        return AdapterRecord(**{**body, "version": int(version)})

    async def _get_owned(self, owner: str, name: str, version: int) -> AdapterRecord | None:
        if not version:
            current = await self._redis.hget(adapter_index(owner), name)
            if current is None:
                return None
            version = int(current)
        raw = await self._redis.hget(adapter_versions(owner, name), str(version))
        if raw is None:
            return None
        try:
            return AdapterRecord(**{**json.loads(raw), "version": version})
        except (TypeError, ValueError):
            # One corrupt record must not break listing for everyone: skip it, loudly.
            log.error("malformed adapter record", extra={"owner": owner, "adapter": name})
            return None

    async def resolve(self, tenant: str, name: str, version: int = 0) -> AdapterRecord:
        """The tenant's own adapter, else a platform-shared one. Another tenant's adapter
        gets the same NOT_FOUND as a missing one, so its existence does not leak."""
        check_tenant(tenant)
        check_adapter_name(name)
        for owner in (tenant, PLATFORM):
            record = await self._get_owned(owner, name, version)
            if record is not None:
                return record
        suffix = f" version {version}" if version else ""
        raise NotFound(f"adapter {name!r}{suffix} not found", reason="ADAPTER_NOT_FOUND")

    async def list(
        self, tenant: str, page_size: int = 100, page_token: str = ""
    ) -> tuple[list[AdapterRecord], str]:
        """Current versions of the tenant's adapters, then the shared ones, by name."""
        check_tenant(tenant)
        if page_size < 0 or page_size > 1000:
            raise InvalidArgument("page_size must be in [0, 1000]", reason="BAD_PAGE_SIZE")
        page_size = page_size or 100
        offset = decode_page_token(page_token)
        entries: list[tuple[str, str, int]] = []
        for owner in (tenant, PLATFORM):
            current = await self._redis.hgetall(adapter_index(owner))
            entries += sorted((owner, n.decode(), int(v)) for n, v in current.items())
        page = entries[offset : offset + page_size]
        records = []
        for owner, name, version in page:
            record = await self._get_owned(owner, name, version)
            if record is not None:
                records.append(record)
        next_token = (
            encode_page_token(offset + page_size) if offset + page_size < len(entries) else ""
        )
        return records, next_token
