"""Training jobs in Redis: records, a queue per tenant, leases kept alive by heartbeats.

Keys (all of one tenant's share its hash tag, so each script below touches one slot):
  lp:{t}:training:job:<id>       hash  the job (JSON-valued fields where structured)
  lp:{t}:training:data:<id>      string the job's data splits (JSON)
  lp:{t}:training:jobs           zset  id -> creation time (listing, newest first)
  lp:{t}:training:queue          zset  id -> creation time (oldest first; a job put back
                                        after a lost worker keeps its place at the front)
  lp:{t}:training:leases         zset  id -> lease expiry (the tenant's running jobs)
  lp:{_platform}:training:tenants set  tenants that ever queued a job (workers look there)

A worker claims a job with a random lease token; every write it makes afterwards (progress,
the result) is fenced by that token, so a worker that lost its lease (it stalled, its lease
expired, another worker took the job) can no longer change the job. Expired leases are put
back in the queue by any worker (reap), up to max_attempts takes in all.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis

from services.common.errors import FailedPrecondition, InvalidArgument, NotFound
from services.common.keys import PLATFORM, key
from services.common.names import check_tenant
from services.common.paging import decode_page_token, encode_page_token

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = (
    "queued",
    "running",
    "succeeded",
    "failed",
    "cancelled",
)
FINISHED = (SUCCEEDED, FAILED, CANCELLED)
TENANTS = key(PLATFORM, "training", "tenants")


def job_key(tenant: str, job_id: str) -> str:
    return key(tenant, "training", "job", job_id)


def data_key(tenant: str, job_id: str) -> str:
    return key(tenant, "training", "data", job_id)


def _tenant_keys(tenant: str) -> list[str]:
    return [
        key(tenant, "training", "queue"),
        key(tenant, "training", "leases"),
        key(tenant, "training", "jobs"),
    ]


def _prefix(tenant: str) -> str:
    return job_key(tenant, "")


# KEYS[1] queue, KEYS[2] leases; ARGV: now, lease seconds, token, worker, max running,
# job key prefix. Returns the claimed id, or nil (nothing queued, or the tenant is at its
# limit).
_CLAIM = """
if redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[5]) then return false end
local ids = redis.call('ZRANGE', KEYS[1], 0, 0)
if #ids == 0 then return false end
local id = ids[1]
local job = ARGV[6] .. id
redis.call('ZREM', KEYS[1], id)
redis.call('ZADD', KEYS[2], tonumber(ARGV[1]) + tonumber(ARGV[2]), id)
redis.call('HSET', job, 'state', 'running', 'lease', ARGV[3], 'worker', ARGV[4])
redis.call('HSETNX', job, 'started', ARGV[1])
redis.call('HINCRBY', job, 'attempts', 1)
redis.call('HINCRBY', job, 'rev', 1)
return id
"""

# KEYS[2] leases; ARGV: id, token, now, lease seconds, job key. Returns -1 when the lease is
# no longer this token's, else 1 when a cancel was requested, 0 otherwise.
_HEARTBEAT = """
if redis.call('HGET', ARGV[5], 'lease') ~= ARGV[2] then return -1 end
redis.call('ZADD', KEYS[2], tonumber(ARGV[3]) + tonumber(ARGV[4]), ARGV[1])
if redis.call('HGET', ARGV[5], 'cancel') == '1' then return 1 end
return 0
"""

# KEYS[1] the job (declared: on a cluster a script is sent to its first key's node);
# ARGV: token, then field/value pairs. 0 when the lease is not this token's.
_UPDATE = """
if redis.call('HGET', KEYS[1], 'lease') ~= ARGV[1] then return 0 end
for i = 2, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
redis.call('HINCRBY', KEYS[1], 'rev', 1)
return 1
"""

# KEYS[2] leases; ARGV: job key, token, id, then field/value pairs (state among them);
# optionally a candidate record: KEYS[4] candidate hash, KEYS[5] candidates zset, and the
# last two ARGV are its JSON and its member name ('' when none). Fenced like _UPDATE.
_FINISH = """
if redis.call('HGET', ARGV[1], 'lease') ~= ARGV[2] then return 0 end
local n = #ARGV
if KEYS[4] then
  redis.call('SET', KEYS[4], ARGV[n - 1])
  redis.call('ZADD', KEYS[5], tonumber(cjson.decode(ARGV[n - 1])['created']), ARGV[n])
  n = n - 2
end
for i = 4, n, 2 do redis.call('HSET', ARGV[1], ARGV[i], ARGV[i + 1]) end
redis.call('HDEL', ARGV[1], 'lease')
redis.call('ZREM', KEYS[2], ARGV[3])
redis.call('HINCRBY', ARGV[1], 'rev', 1)
return 1
"""

# KEYS[1] queue, KEYS[2] leases; ARGV: now, max attempts, job key prefix. Puts jobs whose
# lease expired back in the queue (or fails / cancels them). Returns how many.
_REAP = """
local ids = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', ARGV[1])
for _, id in ipairs(ids) do
  local job = ARGV[3] .. id
  redis.call('ZREM', KEYS[2], id)
  redis.call('HDEL', job, 'lease')
  local attempts = tonumber(redis.call('HGET', job, 'attempts') or '0')
  if redis.call('HGET', job, 'cancel') == '1' then
    redis.call('HSET', job, 'state', 'cancelled', 'ended', ARGV[1])
  elseif attempts >= tonumber(ARGV[2]) then
    redis.call('HSET', job, 'state', 'failed', 'ended', ARGV[1], 'error_reason', 'WORKER_LOST',
      'error_message', 'the job lost its worker ' .. attempts .. ' times')
  else
    redis.call('HSET', job, 'state', 'queued')
    redis.call('ZADD', KEYS[1], tonumber(redis.call('HGET', job, 'created')), id)
  end
  redis.call('HINCRBY', job, 'rev', 1)
end
return #ids
"""

# KEYS[1] queue; ARGV: job key, id, now. FINISHED, CANCELLED (was queued) or REQUESTED.
_CANCEL = """
local state = redis.call('HGET', ARGV[1], 'state')
if not state then return 'NOT_FOUND' end
if state == 'succeeded' or state == 'failed' or state == 'cancelled' then return 'FINISHED' end
redis.call('HSET', ARGV[1], 'cancel', '1')
if state == 'queued' then
  redis.call('ZREM', KEYS[1], ARGV[2])
  redis.call('HSET', ARGV[1], 'state', 'cancelled', 'ended', ARGV[3])
  redis.call('HINCRBY', ARGV[1], 'rev', 1)
  return 'CANCELLED'
end
redis.call('HINCRBY', ARGV[1], 'rev', 1)
return 'REQUESTED'
"""

_JSON_FIELDS = ("params", "progress", "record", "init_adapter")


@dataclass
class Job:
    id: str
    tenant: str
    adapter: str
    method: str
    state: str
    params: dict[str, Any]
    init_adapter: dict[str, Any]  # {"name", "version"}; name "" = fresh
    data_source: str
    data_fingerprint: str
    train_examples: int
    heldout_examples: int
    created: float
    progress: dict[str, Any] = field(default_factory=dict)
    record: dict[str, Any] = field(default_factory=dict)
    candidate_version: int = 0
    error_reason: str = ""
    error_message: str = ""
    cancel_requested: bool = False
    attempts: int = 0
    started: float = 0.0
    ended: float = 0.0
    rev: int = 0

    @property
    def finished(self) -> bool:
        return self.state in FINISHED

    def to_fields(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for name, value in self.__dict__.items():
            if name == "cancel_requested":
                out["cancel"] = "1" if value else "0"
            elif name in _JSON_FIELDS:
                out[name] = json.dumps(value)
            else:
                out[name] = str(value)
        return out

    @classmethod
    def from_fields(cls, raw: dict[bytes, bytes]) -> Job:
        f = {k.decode(): v.decode() for k, v in raw.items()}
        return cls(
            id=f["id"],
            tenant=f["tenant"],
            adapter=f["adapter"],
            method=f["method"],
            state=f["state"],
            params=json.loads(f["params"]),
            init_adapter=json.loads(f["init_adapter"]),
            data_source=f["data_source"],
            data_fingerprint=f["data_fingerprint"],
            train_examples=int(f["train_examples"]),
            heldout_examples=int(f["heldout_examples"]),
            created=float(f["created"]),
            progress=json.loads(f.get("progress") or "{}"),
            record=json.loads(f.get("record") or "{}"),
            candidate_version=int(f.get("candidate_version") or 0),
            error_reason=f.get("error_reason", ""),
            error_message=f.get("error_message", ""),
            cancel_requested=f.get("cancel") == "1",
            attempts=int(f.get("attempts") or 0),
            started=float(f.get("started") or 0),
            ended=float(f.get("ended") or 0),
            rev=int(f.get("rev") or 0),
        )


def new_job_id() -> str:
    return uuid.uuid4().hex


def check_job_id(job_id: str) -> str:
    if len(job_id) != 32 or any(c not in "0123456789abcdef" for c in job_id):
        raise InvalidArgument(f"invalid job id {job_id!r}", reason="BAD_JOB_ID")
    return job_id


@dataclass(frozen=True)
class Lease:
    tenant: str
    job_id: str
    token: str


class JobStore:
    def __init__(self, redis: aioredis.Redis, retention_seconds: int) -> None:
        self.redis = redis
        self.retention = retention_seconds
        self._claim = redis.register_script(_CLAIM)
        self._heartbeat = redis.register_script(_HEARTBEAT)
        self._update = redis.register_script(_UPDATE)
        self._finish = redis.register_script(_FINISH)
        self._reap = redis.register_script(_REAP)
        self._cancel = redis.register_script(_CANCEL)

    # -- the service's side -----------------------------------------------------------------

    async def create(self, job: Job, data: bytes) -> Job:
        queue, _, jobs = _tenant_keys(job.tenant)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.set(data_key(job.tenant, job.id), data, ex=self.retention)
            pipe.hset(job_key(job.tenant, job.id), mapping=job.to_fields())
            pipe.expire(job_key(job.tenant, job.id), self.retention)
            pipe.zadd(jobs, {job.id: job.created})
            pipe.zadd(queue, {job.id: job.created})
            await pipe.execute()
        await self.redis.sadd(TENANTS, job.tenant)  # after the queue: a worker finds it
        return job

    async def get(self, tenant: str, job_id: str) -> Job:
        check_tenant(tenant)
        raw = await self.redis.hgetall(job_key(tenant, check_job_id(job_id)))
        if not raw:
            raise NotFound(f"training job {job_id!r} not found", reason="JOB_NOT_FOUND")
        return Job.from_fields(raw)

    async def list(self, tenant: str, page_size: int, page_token: str) -> tuple[list[Job], str]:
        check_tenant(tenant)
        if page_size < 0 or page_size > 1000:
            raise InvalidArgument("page_size must be in [0, 1000]", reason="BAD_PAGE_SIZE")
        page_size = page_size or 50
        offset = decode_page_token(page_token)
        jobs_key = _tenant_keys(tenant)[2]
        ids = await self.redis.zrevrange(jobs_key, offset, offset + page_size)
        out = []
        for raw_id in ids[:page_size]:
            raw = await self.redis.hgetall(job_key(tenant, raw_id.decode()))
            if raw:  # expired records drop out of the listing
                out.append(Job.from_fields(raw))
            else:
                await self.redis.zrem(jobs_key, raw_id)
        token = encode_page_token(offset + page_size) if len(ids) > page_size else ""
        return out, token

    async def cancel(self, tenant: str, job_id: str) -> Job:
        job = await self.get(tenant, job_id)
        status = await self._cancel(
            keys=[_tenant_keys(tenant)[0]], args=[job_key(tenant, job.id), job.id, time.time()]
        )
        if status == b"FINISHED":
            raise FailedPrecondition(
                f"training job {job_id} already finished ({job.state}); nothing to cancel",
                reason="JOB_FINISHED",
                state=job.state,
            )
        return await self.get(tenant, job_id)

    async def read_data(self, tenant: str, job_id: str) -> bytes:
        data = await self.redis.get(data_key(tenant, job_id))
        if data is None:
            raise NotFound(f"the data of job {job_id} expired", reason="JOB_DATA_MISSING")
        return data

    # -- the workers' side ------------------------------------------------------------------

    async def tenants(self) -> list[str]:
        return sorted(t.decode() for t in await self.redis.smembers(TENANTS))

    async def claim(self, tenant: str, worker: str, lease: float, max_running: int) -> Lease | None:
        token = uuid.uuid4().hex
        job_id = await self._claim(
            keys=_tenant_keys(tenant)[:2],
            args=[time.time(), lease, token, worker, max_running, _prefix(tenant)],
        )
        return Lease(tenant, job_id.decode(), token) if job_id else None

    async def heartbeat(self, lease: Lease, seconds: float) -> int:
        """-1: the lease is lost; 1: a cancel was requested; 0: carry on."""
        return int(
            await self._heartbeat(
                keys=_tenant_keys(lease.tenant)[:2],
                args=[
                    lease.job_id,
                    lease.token,
                    time.time(),
                    seconds,
                    job_key(lease.tenant, lease.job_id),
                ],
            )
        )

    async def update(self, lease: Lease, **values: Any) -> bool:
        args: list[Any] = [lease.token]
        for name, value in values.items():
            args += [name, json.dumps(value) if name in _JSON_FIELDS else value]
        keys = [job_key(lease.tenant, lease.job_id)]
        return bool(await self._update(keys=keys, args=args))

    async def finish(
        self,
        lease: Lease,
        state: str,
        candidate: tuple[str, str, dict[str, Any]] | None = None,
        **values: Any,
    ) -> bool:
        """Fenced: False (nothing written) when the lease is no longer ours. `candidate`
        (its key, its zset, its record) is written in the same step."""
        keys = _tenant_keys(lease.tenant)
        args: list[Any] = [job_key(lease.tenant, lease.job_id), lease.token, lease.job_id]
        for name, value in {"state": state, "ended": time.time(), **values}.items():
            args += [name, json.dumps(value) if name in _JSON_FIELDS else value]
        if candidate is not None:
            candidate_key, candidates_key, record = candidate
            keys += [candidate_key, candidates_key]
            args += [json.dumps(record), record["member"]]
        return bool(await self._finish(keys=keys, args=args))

    async def reap(self, tenant: str, max_attempts: int) -> int:
        return int(
            await self._reap(
                keys=_tenant_keys(tenant)[:2], args=[time.time(), max_attempts, _prefix(tenant)]
            )
        )
