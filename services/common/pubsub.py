"""A Redis pub/sub channel listened to for as long as a process runs.

ChannelListener subscribes, hands every message to handle() one at a time, in order, and
after a lost connection resubscribes (backing off up to max_retry_seconds) and calls
resync(): messages published meanwhile were missed, so whatever they would have
invalidated must be dropped. `generation` changes whenever the stream of messages may have
had a gap (the subscription was lost, or it came back), so a cache can tell whether an
entry was kept up to date by one unbroken subscription. Nothing stops it but close().
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
from collections.abc import Callable
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster

from services.common.errors import LoraplexError

log = logging.getLogger(__name__)


async def best_effort(func: Callable[..., Any], *args: Any, what: str) -> bool:
    """Call a hook (sync or async); log and swallow what it raises."""
    try:
        result = func(*args)
        if inspect.isawaitable(result):
            await result
        return True
    except asyncio.CancelledError:
        raise
    except LoraplexError as err:
        log.warning(f"{what} failed", extra={"reason": err.reason, "error": err.message})
    except Exception:
        log.exception(f"{what} failed")
    return False


class ChannelListener:
    """Subclasses override handle(data) and, where they cache anything, resync()."""

    def __init__(
        self,
        redis: aioredis.Redis | RedisCluster,
        channel: str,
        *,
        name: str = "channel listener",
        min_retry_seconds: float = 0.05,
        max_retry_seconds: float = 5.0,
    ) -> None:
        self._redis = redis
        self.channel = channel
        self.name = name
        self._min_retry = min_retry_seconds
        self._max_retry = max_retry_seconds
        self._task: asyncio.Task[None] | None = None
        self._reconnected = False
        self.subscribed = asyncio.Event()
        self.reconnects = 0
        self.generation = 0

    async def handle(self, data: bytes) -> None:
        """One message, as published."""

    async def resync(self) -> None:
        """Called after a resubscription: messages published meanwhile were missed."""

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=self.name)

    async def wait_subscribed(self, timeout: float = 10.0) -> None:
        await asyncio.wait_for(self.subscribed.wait(), timeout)

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def stop(self) -> None:
        """For synchronous shutdown paths: cancel; the task closes its connection as it ends."""
        if self._task is not None:
            self._task.cancel()
            self._task = None
        self._lost()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self._lost()

    def _lost(self) -> None:
        self.subscribed.clear()
        self.generation += 1

    def _connected_again(self, _connection: Any) -> None:
        # redis-py may reconnect (and resubscribe) by itself inside a read.
        self._reconnected = True
        self.generation += 1

    async def _run(self) -> None:
        delay = self._min_retry
        first = True
        while True:
            pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
            try:
                if isinstance(self._redis, RedisCluster):
                    # A cluster client learns the slot map on its first command; a
                    # subscription needs it first. Any node will do: every PUBLISH
                    # reaches every node.
                    await self._redis.initialize()
                await pubsub.subscribe(self.channel)
                if pubsub.connection is not None:
                    pubsub.connection.register_connect_callback(self._connected_again)
                self._reconnected = False
                self.generation += 1
                self.subscribed.set()
                if not first:
                    await self._resync()
                first, delay = False, self._min_retry
                while True:
                    message = await pubsub.get_message(timeout=1.0)
                    if self._reconnected:
                        self._reconnected = False
                        await self._resync()
                    if message is not None and message.get("type") == "message":
                        await best_effort(self.handle, message["data"], what=self.name)
            except asyncio.CancelledError:
                raise
            except Exception as err:  # a lost connection, or anything else: start over
                self._lost()
                log.warning(
                    f"{self.name} lost its subscription; retrying",
                    extra={"error": repr(err), "retry_seconds": delay},
                )
            finally:
                if pubsub.connection is not None:  # it goes back to the pool: unhook us
                    pubsub.connection.deregister_connect_callback(self._connected_again)
                # Closing a dead connection may fail; it is gone anyway.
                with contextlib.suppress(Exception):
                    await pubsub.aclose()
            await asyncio.sleep(delay)
            delay = min(delay * 2, self._max_retry)

    async def _resync(self) -> None:
        self.reconnects += 1
        log.info(f"{self.name} resubscribed; messages published meanwhile may have been missed")
        await best_effort(self.resync, what=f"{self.name} resync")
