"""Adapter registry in Redis: which adapters each tenant has, their versions and metadata.

Keys (owner is a tenant id, or the platform tag for shared adapters):
  lp:{owner}:adapters                    hash  name -> serving ("current") version
  lp:{owner}:adapter:<name>:versions     hash  version -> JSON record
  lp:{owner}:adapter:<name>:history      list  versions that served before, newest first
  lp:{owner}:adapter:<name>:candidates   set   candidate versions (registered, never served)

Requests that ask for version 0 get the serving version. Registering a version makes it
serve (unless activate=False and something already serves); swap() makes any registered
version serve; rollback() makes the one that served before serve again. Every change of
the serving version is one Lua script, which also publishes a SwapEvent on SWAP_CHANNEL so
every inference replica hears of it.

A candidate (register(candidate=True), e.g. a trained version awaiting its A/B test) never
serves by itself, not even as the first version of a name: requests reach it only by
naming its version. swap() promotes it (it stops being a candidate); discard() drops it.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field

import redis.asyncio as aioredis

from services.common.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from services.common.keys import PLATFORM, adapter_index, adapter_versions, key
from services.common.names import check_adapter_name, check_tenant
from services.common.paging import decode_page_token, encode_page_token

log = logging.getLogger(__name__)

# Pub/sub channel (not a key) on which every change of a serving version is announced.
SWAP_CHANNEL = key(PLATFORM, "events", "adapter-swaps")
# How many earlier serving versions each adapter remembers for rollback.
HISTORY_LIMIT = 10


def adapter_history(owner: str, name: str) -> str:
    """List: versions that served before the current one, newest first."""
    return key(owner, "adapter", name, "history")


def adapter_candidates(owner: str, name: str) -> str:
    """Set: candidate versions (registered without serving, not yet promoted)."""
    return key(owner, "adapter", name, "candidates")


# Shared by the scripts below: make ARGV[2] serve (it stops being a candidate); push what
# served before onto the history (unless rolling back, which pops it), and announce the
# change. KEYS[2] index, KEYS[3] history, KEYS[4] candidates; ARGV[1] name; ARGV[4] history
# limit; ARGV[5] channel; ARGV[6] owner; ARGV[7] sha256; ARGV[8] time of the change; ARGV[9]
# kind.
_SERVE = """
local function serve(version, current, pop)
  redis.call('HSET', KEYS[2], ARGV[1], version)
  redis.call('SREM', KEYS[4], tostring(version))
  if pop then
    redis.call('LPOP', KEYS[3])
  elseif current and current ~= tostring(version) then
    redis.call('LPUSH', KEYS[3], current)
    redis.call('LTRIM', KEYS[3], 0, tonumber(ARGV[4]) - 1)
  end
  if current ~= tostring(version) then
    redis.call('PUBLISH', ARGV[5], cjson.encode({
      owner = ARGV[6], name = ARGV[1], version = tonumber(version), sha256 = ARGV[7],
      previous = tonumber(current) or 0, at = tonumber(ARGV[8]), kind = ARGV[9]}))
  end
end
"""

# Allocates the version (max + 1 when 0 is asked) and, when asked to or when nothing serves
# yet, makes it serve; a candidate never serves. KEYS[1] versions; ARGV[2] version; ARGV[3]
# record JSON; ARGV[10] activate ('1'/'0'); ARGV[11] candidate ('1'/'0').
_REGISTER = (
    _SERVE
    + """
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
local current = redis.call('HGET', KEYS[2], ARGV[1])
if ARGV[11] == '1' then
  redis.call('SADD', KEYS[4], tostring(version))
elseif ARGV[10] == '1' or not current then
  serve(version, current, false)
end
return version
"""
)

# Makes a registered version serve. KEYS[1] versions; ARGV[2] version; ARGV[3] expected
# sha256 ('' = any); ARGV[9] 'swap' or 'rollback' (then ARGV[2] must still be the history's
# head, which the caller verified). Returns {status, previous version}.
_SWAP = (
    _SERVE
    + """
local raw = redis.call('HGET', KEYS[1], ARGV[2])
local current = redis.call('HGET', KEYS[2], ARGV[1])
if not raw then return {'NOT_FOUND', ''} end
-- Only a candidate may be the first version to serve (the others served at registration).
if not current and redis.call('SISMEMBER', KEYS[4], ARGV[2]) == 0 then
  return {'NOT_FOUND', ''}
end
local sha256 = cjson.decode(raw)['sha256']
if ARGV[3] ~= '' and sha256 ~= ARGV[3] then return {'SHA256_MISMATCH', sha256} end
local rollback = ARGV[9] == 'rollback'
if rollback and redis.call('LINDEX', KEYS[3], 0) ~= ARGV[2] then
  return {'CONFLICT', current}
end
serve(ARGV[2], current, rollback)
return {'OK', current or '0'}
"""
)

# Drops a candidate version. KEYS[1] versions, KEYS[4] candidates; ARGV[2] version.
_DISCARD = """
if redis.call('SISMEMBER', KEYS[4], ARGV[2]) == 0 then
  if redis.call('HEXISTS', KEYS[1], ARGV[2]) == 0 then return 'NOT_FOUND' end
  return 'NOT_A_CANDIDATE'
end
redis.call('SREM', KEYS[4], ARGV[2])
redis.call('HDEL', KEYS[1], ARGV[2])
return 'OK'
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


@dataclass(frozen=True)
class SwapResult:
    """What served before a change of the serving version, and what serves now (the same
    record twice when the version asked for was already serving)."""

    previous: AdapterRecord
    current: AdapterRecord
    swapped_at: float


class SwapConflict(Exception):
    """A rollback lost a race with another change of the same adapter; look again."""


def check_expected_sha256(value: str) -> str:
    """'' (no expectation) or 64 hex digits, lowercased."""
    value = value.lower()
    if value and (len(value) != 64 or any(c not in "0123456789abcdef" for c in value)):
        raise InvalidArgument("expected_sha256 must be 64 hexadecimal digits", reason="BAD_SHA256")
    return value


def _not_found(name: str, version: int = 0) -> NotFound:
    suffix = f" version {version}" if version else ""
    return NotFound(f"adapter {name!r}{suffix} not found", reason="ADAPTER_NOT_FOUND")


class AdapterRegistry:
    def __init__(self, redis: aioredis.Redis) -> None:
        self._redis = redis
        self._register = redis.register_script(_REGISTER)
        self._swap = redis.register_script(_SWAP)
        self._discard = redis.register_script(_DISCARD)

    @staticmethod
    def _keys(owner: str, name: str) -> list[str]:
        return [
            adapter_versions(owner, name),
            adapter_index(owner),
            adapter_history(owner, name),
            adapter_candidates(owner, name),
        ]

    @staticmethod
    def _args(owner: str, name: str, version: int, sha256: str, kind: str) -> list[object]:
        """ARGV[1..9] as the scripts' shared part reads them."""
        return [name, version, "", HISTORY_LIMIT, SWAP_CHANNEL, owner, sha256, time.time(), kind]

    async def register(
        self, record: AdapterRecord, activate: bool = True, candidate: bool = False
    ) -> AdapterRecord:
        """Record a new version (record.version 0 means 'next'). It serves from now on if
        `activate`, or if no version of the adapter serves yet; else it waits for a swap.
        A `candidate` never serves until swap() promotes it."""
        body = asdict(record)
        del body["version"]
        body["created_at"] = record.created_at or time.time()
        args = self._args(record.owner, record.name, record.version, record.sha256, "register")
        args[2] = json.dumps(body)
        version = await self._register(
            keys=self._keys(record.owner, record.name),
            args=[*args, "1" if activate else "0", "1" if candidate else "0"],
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

    async def get(self, owner: str, name: str, version: int = 0) -> AdapterRecord:
        """One owner's adapter (no fallback to the platform's); version 0: the serving one."""
        check_adapter_name(name)
        record = await self._get_owned(owner, name, version)
        if record is None:
            raise _not_found(name, version)
        return record

    async def resolve(self, tenant: str, name: str, version: int = 0) -> AdapterRecord:
        """The tenant's own adapter, else a platform-shared one. Another tenant's adapter
        gets the same NOT_FOUND as a missing one, so its existence does not leak."""
        check_tenant(tenant)
        check_adapter_name(name)
        for owner in (tenant, PLATFORM):
            record = await self._get_owned(owner, name, version)
            if record is not None:
                return record
        raise _not_found(name, version)

    async def is_candidate(self, owner: str, name: str, version: int) -> bool:
        return bool(await self._redis.sismember(adapter_candidates(owner, name), str(version)))

    async def serving_version(self, owner: str, name: str) -> int:
        """The version that serves requests naming none; 0 when none does."""
        current = await self._redis.hget(adapter_index(owner), name)
        return int(current) if current is not None else 0

    async def discard(self, owner: str, name: str, version: int) -> AdapterRecord:
        """Drop a candidate version from the registry (its files stay in the store, which
        is content-addressed). Any other version: FAILED_PRECONDITION, nothing changes."""
        record = await self.get(owner, name, version) if version > 0 else None
        if record is None:
            raise InvalidArgument("give the candidate's version (1 or more)", reason="BAD_VERSION")
        status = await self._discard(keys=self._keys(owner, name), args=[name, version])
        status = status.decode() if isinstance(status, bytes) else status
        if status == "NOT_FOUND":
            raise _not_found(name, version)
        if status == "NOT_A_CANDIDATE":
            raise FailedPrecondition(
                f"adapter {name!r} version {version} is not a candidate (it was promoted, or "
                "registered to serve); only candidates can be discarded",
                reason="NOT_A_CANDIDATE",
            )
        return record

    async def history(self, owner: str, name: str) -> list[int]:
        """Versions that served before the serving one, newest first (rollback's order)."""
        return [int(v) for v in await self._redis.lrange(adapter_history(owner, name), 0, -1)]

    async def swap(
        self, owner: str, name: str, version: int, expected_sha256: str = ""
    ) -> SwapResult:
        """Make a registered version serve, atomically; what served before goes on the
        history. Refused (FAILED_PRECONDITION, nothing changes) when expected_sha256 is given
        and differs from the version's recorded sha256."""
        check_adapter_name(name)
        if version <= 0:
            raise InvalidArgument("give the version to serve (1 or more)", reason="BAD_VERSION")
        expected = check_expected_sha256(expected_sha256)
        return await self._change(owner, name, version, expected, "swap")

    async def rollback(self, owner: str, name: str, version: int) -> SwapResult:
        """Make `version`, the head of the history (see rollback_target), serve again and
        drop it from the history. SwapConflict if the history changed meanwhile."""
        return await self._change(owner, name, version, "", "rollback")

    async def rollback_target(self, owner: str, name: str) -> AdapterRecord:
        """The version a rollback would make serve: the one that served before."""
        await self.get(owner, name)  # unknown adapter: NOT_FOUND before anything else
        head = await self._redis.lindex(adapter_history(owner, name), 0)
        if head is None:
            raise FailedPrecondition(
                f"adapter {name!r} has no earlier serving version to roll back to",
                reason="NO_PREVIOUS_VERSION",
            )
        return await self.get(owner, name, int(head))

    async def _change(
        self, owner: str, name: str, version: int, expected_sha256: str, kind: str
    ) -> SwapResult:
        target = await self.get(owner, name, version)
        args = self._args(owner, name, version, target.sha256, kind)
        args[2] = expected_sha256
        swapped_at = float(args[7])
        status, detail = await self._swap(keys=self._keys(owner, name), args=args)
        status, detail = status.decode(), detail.decode()
        if status == "NOT_FOUND":
            raise _not_found(name, version)
        if status == "SHA256_MISMATCH":
            raise FailedPrecondition(
                f"adapter {name!r} version {version} has sha256 {detail}, "
                f"not the expected {expected_sha256}; nothing was swapped",
                reason="SHA256_MISMATCH",
                expected_sha256=expected_sha256,
                actual_sha256=detail,
            )
        if status == "CONFLICT":
            raise SwapConflict(name)
        # What served before: the target itself when it already served, or when nothing did.
        served = int(detail)
        previous = target if served in (0, version) else await self.get(owner, name, served)
        return SwapResult(previous=previous, current=target, swapped_at=swapped_at)

    async def list(
        self, tenant: str, page_size: int = 100, page_token: str = ""
    ) -> tuple[list[AdapterRecord], str]:
        """Serving versions of the tenant's adapters, then the shared ones, by name."""
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
