"""RedisOutbox: a BatchExporter's queue kept in Redis, so what it holds survives the
receiver's outages of any length and the sender's own crash.

One Redis stream per sender instance (e.g. one per gateway), read through a consumer group
with one consumer. The sender reads its pending entries first: after a crash, or a send
whose retries ran out, that is exactly the batch it had read last, so it is sent again
under the same batch id (made of its first and last entry ids) and a receiver that
de-duplicates batch ids counts it once. An acknowledged batch is XACKed and XDELed in one
transaction, so the stream's length is what is still to send. The length is bounded:
past it, add() refuses the newest items and says how many it took (the caller counts the
rest as dropped); trimming would silently lose the oldest instead.

The stream lives as long as Redis keeps it: with the append-only file on, a Redis restart
loses nothing.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

import redis.asyncio as aioredis
import redis.exceptions

T = TypeVar("T")

GROUP = CONSUMER = "sender"
_FIELD = b"i"

# KEYS[1]: the stream. ARGV[1]: its bound; ARGV[2..]: items. Appends those that fit, all
# or the first ones; returns how many.
_ADD = """
local room = tonumber(ARGV[1]) - redis.call('XLEN', KEYS[1])
local n = math.max(0, math.min(room, #ARGV - 1))
for i = 2, n + 1 do
  redis.call('XADD', KEYS[1], '*', 'i', ARGV[i])
end
return n
"""


@dataclass(frozen=True)
class Batch(Generic[T]):
    ids: list[bytes]  # stream entry ids, oldest first
    items: list[T]
    batch_id: str  # the same each time these entries are read


class RedisOutbox(Generic[T]):
    def __init__(
        self,
        redis: aioredis.Redis,
        key: str,
        *,
        batch_prefix: str,
        encode: Callable[[T], bytes],
        decode: Callable[[bytes], T],
        max_length: int,
    ) -> None:
        """batch_prefix names this outbox in batch ids (unique per sender instance)."""
        self.key = key
        self._redis = redis
        self._prefix = batch_prefix
        self._encode, self._decode = encode, decode
        self.max_length = max_length
        self._add = redis.register_script(_ADD)

    async def add(self, items: Sequence[T]) -> int:
        """Appends the items (all, or the first ones while there is room); how many."""
        args = [self.max_length, *(self._encode(item) for item in items)]
        return int(await self._add(keys=[self.key], args=args))

    async def take(self, max_items: int) -> Batch[T] | None:
        """The batch read last and not acknowledged, else up to max_items new entries."""
        try:
            entries = await self._read("0", None)  # our pending entries: one batch at most
            if not entries:
                entries = await self._read(">", max_items)
        except redis.exceptions.ResponseError as err:
            if not str(err).startswith("NOGROUP"):
                raise
            # First use, or a Redis that lost its data: start reading from the beginning.
            try:
                await self._redis.xgroup_create(self.key, GROUP, id="0", mkstream=True)
            except redis.exceptions.ResponseError as exists:
                if not str(exists).startswith("BUSYGROUP"):
                    raise
            entries = await self._read(">", max_items)
        if not entries:
            return None
        ids = [entry_id for entry_id, _ in entries]
        items = [self._decode(fields[_FIELD]) for _, fields in entries]
        first, last = (i.decode() for i in (ids[0], ids[-1]))
        return Batch(ids, items, f"{self._prefix}:{first}:{last}")

    async def _read(self, start: str, count: int | None) -> list:
        reply = await self._redis.xreadgroup(GROUP, CONSUMER, {self.key: start}, count=count)
        # [[key, [(id, fields), ...]]] (RESP2, what connect() gets by default). An entry
        # deleted while pending reads back without fields: never ours, we ack and delete
        # together.
        return [(i, fields) for i, fields in (reply[0][1] if reply else []) if fields]

    async def ack(self, batch: Batch[T]) -> None:
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.xack(self.key, GROUP, *batch.ids)
            pipe.xdel(self.key, *batch.ids)
            await pipe.execute()

    async def backlog(self) -> tuple[int, float]:
        """(entries still to send, age in seconds of the oldest of them)."""
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.xlen(self.key)
            pipe.xrange(self.key, count=1)
            length, oldest = await pipe.execute()
        if not oldest:
            return length, 0.0
        millis = int(oldest[0][0].split(b"-")[0])  # entry ids start with Redis's clock, ms
        return length, max(0.0, time.time() - millis / 1000)
