"""The per-tenant candidate pool and feedback queue in Redis. No gRPC here.

Keys (all under the tenant's hash tag, so each script's keys share one Cluster slot):

    lp:{t}:al:item:<id>        hash    the candidate: prompt, output, adapter, version,
                                       experiment, variant, unit_id, created, scores (JSON),
                                       sampled (JSON: sampling-based scores, once drawn),
                                       method, priority, phash, state, reviews, required,
                                       lease_reviewer, lease_token, lease_expires
    lp:{t}:al:item:<id>:by     set     reviewers who answered it (never handed to them again)
    lp:{t}:al:open             zset    id -> created: never reviewed and not leased (the pool
                                       SelectUncertain picks from)
    lp:{t}:al:feat             hash    id -> adapter NUL float32[5 rank values + embedding]
    lp:{t}:al:queue            zset    id -> priority (highest first)
    lp:{t}:al:leases           zset    id -> lease expiry (Unix seconds)
    lp:{t}:al:closed           zset    id -> closed at
    lp:{t}:al:prompt:<sha1>    set     ids of the outputs of one prompt (pairwise, alternatives)
    lp:{t}:al:feedback         stream  one JSON record per answer (export reads it)
    lp:{t}:al:fbcount          hash    feedback kind -> count
    lp:{t}:al:votes:<kind>     hash    id -> comma-separated values (rating, thumbs): the
                                       input of Krippendorff's alpha

Item states: open (pool only), queued (waiting for a reviewer; also in the pool until its
first review), leased, closed. Leasing and answering are Lua scripts, so two reviewers can
never lease the same item and an answer is applied once, atomically with its lease check.
Item and prompt keys are derived inside the scripts from a key prefix of the same hash tag.
Everything expires after retention_seconds.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import redis.asyncio as aioredis

from services.activelearning.scores import TOKEN_METHODS
from services.common.keys import key

SELECTED_BASE = 1e12  # queue priority of selected items: above any score

_SUBMIT = """
local now, ttl = tonumber(ARGV[1]), tonumber(ARGV[2])
local res = {}
for i = 6, #ARGV, 5 do
  local id, fields, feat, prio, ph = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3], ARGV[i + 4]
  local ik = ARGV[4] .. id
  if redis.call('EXISTS', ik) == 1 then
    res[#res + 1] = 0
  else
    local flat = {}
    for k, v in pairs(cjson.decode(fields)) do flat[#flat + 1] = k; flat[#flat + 1] = v end
    redis.call('HSET', ik, unpack(flat))
    redis.call('EXPIRE', ik, ttl)
    redis.call('ZADD', KEYS[1], now, id)
    redis.call('HSET', KEYS[2], id, feat)
    local pk = ARGV[5] .. ph
    redis.call('SADD', pk, id)
    redis.call('EXPIRE', pk, ttl)
    if ARGV[3] == '1' then
      redis.call('ZADD', KEYS[3], prio, id)
      redis.call('HSET', ik, 'state', 'queued')
    end
    res[#res + 1] = 1
  end
end
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now - ttl)) do
  redis.call('HDEL', KEYS[2], id)
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - ttl)
redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', now - ttl)
return res
"""

# KEYS: open (for the slot). ARGV: item prefix, then (id, JSON) pairs. Sets field "sampled"
# of items that still exist (an expired item is not brought back).
_SET_SAMPLED = """
local n = 0
for i = 2, #ARGV, 2 do
  local ik = ARGV[1] .. ARGV[i]
  if redis.call('EXISTS', ik) == 1 then
    redis.call('HSET', ik, 'sampled', ARGV[i + 1])
    n = n + 1
  end
end
return n
"""

# KEYS: open, queue. ARGV: item prefix, method, then id, priority pairs. Open items only.
# KEYS: feat. ARGV: (id, value) pairs. Replaces only fields that exist (items that left the
# open pool meanwhile stay gone).
_SET_FEAT = """
local n = 0
for i = 1, #ARGV, 2 do
  if redis.call('HEXISTS', KEYS[1], ARGV[i]) == 1 then
    redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
    n = n + 1
  end
end
return n
"""

_ENQUEUE = """
local n = 0
for i = 3, #ARGV, 2 do
  local id = ARGV[i]
  local ik = ARGV[1] .. id
  if redis.call('ZSCORE', KEYS[1], id) and redis.call('EXISTS', ik) == 1 then
    redis.call('ZADD', KEYS[2], ARGV[i + 1], id)
    redis.call('HSET', ik, 'state', 'queued', 'priority', ARGV[i + 1], 'method', ARGV[2])
    n = n + 1
  end
end
return n
"""

# KEYS: queue, leases, open, feat. ARGV: now, reviewer, lease seconds, token, item prefix,
# scan limit. Expired leases go back to the queue first. Returns {id, expiry} or false.
_NEXT = """
local now = tonumber(ARGV[1])
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now)) do
  redis.call('ZREM', KEYS[2], id)
  local ik = ARGV[5] .. id
  local f = redis.call('HMGET', ik, 'priority', 'state')
  if f[1] and f[2] == 'leased' then
    redis.call('HDEL', ik, 'lease_reviewer', 'lease_token', 'lease_expires')
    redis.call('HSET', ik, 'state', 'queued')
    redis.call('ZADD', KEYS[1], f[1], id)
  end
end
for _, id in ipairs(redis.call('ZREVRANGE', KEYS[1], 0, tonumber(ARGV[6]) - 1)) do
  local ik = ARGV[5] .. id
  if redis.call('EXISTS', ik) == 0 then
    redis.call('ZREM', KEYS[1], id)
  elseif redis.call('SISMEMBER', ik .. ':by', ARGV[2]) == 0 then
    local expires = now + tonumber(ARGV[3])
    redis.call('ZREM', KEYS[1], id)
    redis.call('ZREM', KEYS[3], id)
    redis.call('HDEL', KEYS[4], id)
    redis.call('ZADD', KEYS[2], expires, id)
    redis.call('HSET', ik, 'state', 'leased', 'lease_reviewer', ARGV[2],
      'lease_token', ARGV[4], 'lease_expires', tostring(expires))
    return {id, tostring(expires)}
  end
end
return false
"""

# KEYS: item, by, queue, leases, closed, feedback stream, fbcount, votes ('' when none).
# ARGV: now, reviewer, token, id, record JSON, kind, vote ('' when none), ttl, min stream id.
_ANSWER = """
if redis.call('EXISTS', KEYS[1]) == 0 then return {'NOT_FOUND'} end
local f = redis.call('HMGET', KEYS[1], 'state', 'lease_reviewer', 'lease_token',
  'lease_expires', 'reviews', 'required', 'priority')
if f[1] == 'closed' then return {'CLOSED'} end
if f[1] ~= 'leased' or f[2] ~= ARGV[2] or f[3] ~= ARGV[3] then return {'NOT_LEASED'} end
if tonumber(f[4]) <= tonumber(ARGV[1]) then return {'EXPIRED'} end
local fid = redis.call('XADD', KEYS[6], 'MINID', '~', ARGV[9], '*', 'r', ARGV[5])
redis.call('EXPIRE', KEYS[6], ARGV[8])
redis.call('HINCRBY', KEYS[7], ARGV[6], 1)
if ARGV[7] ~= '' then
  local old = redis.call('HGET', KEYS[8], ARGV[4])
  redis.call('HSET', KEYS[8], ARGV[4], old and (old .. ',' .. ARGV[7]) or ARGV[7])
  redis.call('EXPIRE', KEYS[8], ARGV[8])
end
local reviews = tonumber(f[5]) + 1
redis.call('SADD', KEYS[2], ARGV[2])
redis.call('EXPIRE', KEYS[2], ARGV[8])
redis.call('ZREM', KEYS[4], ARGV[4])
redis.call('HDEL', KEYS[1], 'lease_reviewer', 'lease_token', 'lease_expires')
local closed = 0
if reviews >= tonumber(f[6]) then
  closed = 1
  redis.call('HSET', KEYS[1], 'reviews', reviews, 'state', 'closed')
  redis.call('ZADD', KEYS[5], ARGV[1], ARGV[4])
else
  redis.call('HSET', KEYS[1], 'reviews', reviews, 'state', 'queued')
  redis.call('ZADD', KEYS[3], f[7], ARGV[4])
end
return {'OK', fid, reviews, closed}
"""


def prompt_hash(prompt: str) -> str:
    return hashlib.sha1(prompt.encode()).hexdigest()


@dataclass
class StoredCandidate:
    """What SubmitCandidates stores for one accepted candidate."""

    id: str
    prompt: str
    output: str
    adapter: str
    version: int
    experiment: str
    variant: str
    unit_id: str
    rank_values: list[float]  # TOKEN_METHODS order (least_confidence: total NLL)
    scores: dict[str, float]
    embedding: np.ndarray
    priority: float  # queue priority when auto-queued
    method: str  # the method that ranks it in the queue (the server's default)
    # Per token, for the reviewer's view (texts: empty when the caller sent none).
    token_entropies: list[float] = field(default_factory=list)
    token_texts: list[str] = field(default_factory=list)


@dataclass
class Item:
    id: str
    fields: dict[str, str] = field(default_factory=dict)

    def get(self, name: str, default: str = "") -> str:
        return self.fields.get(name, default)

    @property
    def scores(self) -> dict[str, float]:
        """Every method's score: the token methods', and the sampling methods' once drawn."""
        return json.loads(self.get("scores", "{}")) | self.sampled

    @property
    def sampled(self) -> dict[str, float]:
        return json.loads(self.get("sampled", "{}"))

    @property
    def tokens(self) -> dict[str, list]:
        """{"entropies": [...], "texts": [...]} (empty lists for items stored without)."""
        return {"entropies": [], "texts": [], **json.loads(self.get("tokens", "{}"))}


@dataclass(frozen=True)
class Lease:
    item: Item
    token: str
    expires: float


@dataclass(frozen=True)
class Answer:
    status: str  # OK, NOT_FOUND, CLOSED, NOT_LEASED, EXPIRED
    feedback_id: str = ""
    reviews: int = 0
    closed: bool = False


@dataclass
class Pool:
    ids: list[str]
    adapters: list[str]
    rank_values: np.ndarray  # [n, 5]
    embeddings: np.ndarray  # [n, dim]


class FeedbackQueue:
    def __init__(self, redis: aioredis.Redis, retention_seconds: int) -> None:
        self.redis = redis
        self.ttl = retention_seconds
        self._submit = redis.register_script(_SUBMIT)
        self._enqueue = redis.register_script(_ENQUEUE)
        self._next = redis.register_script(_NEXT)
        self._answer = redis.register_script(_ANSWER)
        self._set_feat = redis.register_script(_SET_FEAT)
        self._set_sampled = redis.register_script(_SET_SAMPLED)

    @staticmethod
    def k(tenant: str, *parts: object) -> str:
        return key(tenant, "al", *parts)

    def item_prefix(self, tenant: str) -> str:
        return self.k(tenant, "item", "")

    async def add(
        self,
        tenant: str,
        candidates: list[StoredCandidate],
        *,
        now: float,
        required: int,
        auto_enqueue: bool,
    ) -> list[bool]:
        """Stores candidates whose id is new; True per candidate stored now."""
        if not candidates:
            return []
        args: list[Any] = [now, self.ttl, "1" if auto_enqueue else "0"]
        args += [self.item_prefix(tenant), self.k(tenant, "prompt", "")]
        for c in candidates:
            fields = {
                "prompt": c.prompt,
                "output": c.output,
                "adapter": c.adapter,
                "version": str(c.version),
                "experiment": c.experiment,
                "variant": c.variant,
                "unit_id": c.unit_id,
                "created": repr(now),
                "scores": json.dumps(c.scores),
                "method": c.method,
                "priority": repr(c.priority),
                "phash": prompt_hash(c.prompt),
                "state": "open",
                "reviews": "0",
                "required": str(required),
                "tokens": json.dumps(
                    {"entropies": c.token_entropies, "texts": c.token_texts}, ensure_ascii=False
                ),
            }
            vector = np.concatenate([np.asarray(c.rank_values, np.float32), c.embedding])
            feat = c.adapter.encode() + b"\x00" + vector.astype(np.float32).tobytes()
            args += [c.id, json.dumps(fields), feat, repr(c.priority), fields["phash"]]
        keys = [self.k(tenant, n) for n in ("open", "feat", "queue", "closed")]
        return [bool(r) for r in await self._submit(keys=keys, args=args)]

    async def open_pool(self, tenant: str, limit: int) -> Pool:
        ids = [i.decode() for i in await self.redis.zrevrange(self.k(tenant, "open"), 0, limit - 1)]
        raw = await self.redis.hmget(self.k(tenant, "feat"), ids) if ids else []
        keep, adapters, vectors = [], [], []
        for item_id, value in zip(ids, raw, strict=True):
            if value is None:
                continue
            adapter, _, blob = value.partition(b"\x00")
            keep.append(item_id)
            adapters.append(adapter.decode())
            vectors.append(np.frombuffer(blob, dtype=np.float32))
        n = len(TOKEN_METHODS)
        width = max((len(v) for v in vectors), default=n)
        # All vectors have the same width (one embedding size per server).
        matrix = np.stack(vectors) if vectors else np.zeros((0, width), np.float32)
        return Pool(keep, adapters, matrix[:, :n].astype(np.float64), matrix[:, n:])

    async def set_embeddings(self, tenant: str, ids: list[str], embeddings: np.ndarray) -> int:
        """Replace the embeddings of these open candidates (same size as before); returns
        how many were still open."""
        key = self.k(tenant, "feat")
        raw = await self.redis.hmget(key, ids) if ids else []
        head = len(TOKEN_METHODS) * 4
        args: list[Any] = []
        for item_id, value, vector in zip(ids, raw, embeddings, strict=True):
            if value is None:
                continue
            adapter, _, blob = value.partition(b"\x00")
            vector = np.asarray(vector, dtype=np.float32)
            if len(blob) != head + vector.nbytes:
                continue
            args += [item_id, adapter + b"\x00" + blob[:head] + vector.tobytes()]
        if not args:
            return 0
        return int(await self._set_feat(keys=[key], args=args))

    async def set_sampled(self, tenant: str, scores: dict[str, dict[str, float]]) -> int:
        """Keep items' sampling-based scores (id -> method -> score); returns how many of
        the items still exist."""
        if not scores:
            return 0
        args: list[Any] = [self.item_prefix(tenant)]
        for item_id, values in scores.items():
            args += [item_id, json.dumps(values)]
        return int(await self._set_sampled(keys=[self.k(tenant, "open")], args=args))

    async def enqueue(self, tenant: str, method: str, priorities: list[tuple[str, float]]) -> int:
        args: list[Any] = [self.item_prefix(tenant), method]
        for item_id, priority in priorities:
            args += [item_id, repr(priority)]
        keys = [self.k(tenant, "open"), self.k(tenant, "queue")]
        return int(await self._enqueue(keys=keys, args=args))

    async def item(self, tenant: str, item_id: str) -> Item | None:
        fields = await self.redis.hgetall(self.k(tenant, "item", item_id))
        if not fields:
            return None
        return Item(item_id, {k.decode(): v.decode() for k, v in fields.items()})

    async def items(self, tenant: str, ids: list[str]) -> list[Item | None]:
        async with self.redis.pipeline(transaction=False) as pipe:
            for item_id in ids:
                pipe.hgetall(self.k(tenant, "item", item_id))
            replies = await pipe.execute()
        return [
            Item(i, {k.decode(): v.decode() for k, v in r.items()}) if r else None
            for i, r in zip(ids, replies, strict=True)
        ]

    async def lease(
        self, tenant: str, reviewer: str, token: str, *, now: float, seconds: float
    ) -> Lease | None:
        keys = [self.k(tenant, n) for n in ("queue", "leases", "open", "feat")]
        args = [now, reviewer, seconds, token, self.item_prefix(tenant), 200]
        got = await self._next(keys=keys, args=args)
        if not got:
            return None
        item = await self.item(tenant, got[0].decode())
        if item is None:  # expired between the script and this read
            return None
        return Lease(item, token, float(got[1]))

    async def alternative(self, tenant: str, item: Item) -> Item | None:
        """Another stored output of the same prompt, preferably of another adapter/variant."""
        ids = sorted(
            m.decode()
            for m in await self.redis.smembers(self.k(tenant, "prompt", item.get("phash")))
        )
        others = [i for i in await self.items(tenant, [i for i in ids if i != item.id]) if i]
        others = [o for o in others if o.get("output") != item.get("output")]
        differs = [
            o
            for o in others
            if (o.get("adapter"), o.get("variant")) != (item.get("adapter"), item.get("variant"))
        ]
        return (differs or others or [None])[0]

    async def answer(
        self,
        tenant: str,
        item_id: str,
        reviewer: str,
        token: str,
        record: dict[str, Any],
        vote: str,
        *,
        now: float,
    ) -> Answer:
        kind = record["kind"]
        votes = self.k(tenant, "votes", kind) if vote else self.k(tenant, "votes", "none")
        keys = [
            self.k(tenant, "item", item_id),
            self.k(tenant, "item", item_id, "by"),
            *(self.k(tenant, n) for n in ("queue", "leases", "closed", "feedback", "fbcount")),
            votes,
        ]
        min_id = int((now - self.ttl) * 1000)
        args = [now, reviewer, token, item_id, json.dumps(record), kind, vote, self.ttl, min_id]
        reply = await self._answer(keys=keys, args=args)
        status = reply[0].decode()
        if status != "OK":
            return Answer(status)
        return Answer(status, reply[1].decode(), int(reply[2]), bool(int(reply[3])))

    async def counts(self, tenant: str, now: float) -> dict[str, Any]:
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.zcard(self.k(tenant, "open"))
            pipe.zcard(self.k(tenant, "queue"))
            pipe.zcount(self.k(tenant, "leases"), f"({now}", "+inf")
            pipe.zcard(self.k(tenant, "closed"))
            pipe.hgetall(self.k(tenant, "fbcount"))
            pipe.hgetall(self.k(tenant, "votes", "rating"))
            pipe.hgetall(self.k(tenant, "votes", "thumbs"))
            open_, queued, leased, closed, fb, ratings, thumbs = await pipe.execute()

        def votes(h: dict[bytes, bytes]) -> list[list[float]]:
            return [[float(x) for x in v.decode().split(",")] for v in h.values()]

        return {
            "open": open_,
            "queued": queued,
            "leased": leased,
            "closed": closed,
            "feedback": {k.decode(): int(v) for k, v in fb.items()},
            "ratings": votes(ratings),
            "thumbs": votes(thumbs),
        }

    async def feedback_records(
        self, tenant: str, start: float | None, end: float | None, limit: int
    ) -> tuple[list[dict[str, Any]], bool]:
        """Records with start <= time < end, oldest first; True when more than limit match."""
        lo = "-" if start is None else str(max(0, int(start * 1000)))
        if end is not None and int(end * 1000) <= 0:
            return [], False
        # An ID of milliseconds only, as the end, covers every entry of that millisecond.
        hi = "+" if end is None else str(int(end * 1000) - 1)
        entries = await self.redis.xrange(self.k(tenant, "feedback"), lo, hi, count=limit + 1)
        records = [json.loads(fields[b"r"]) for _, fields in entries[:limit]]
        return records, len(entries) > limit
