"""Entry point: python -m services.analytics"""

from __future__ import annotations

import asyncio
import logging

import redis.exceptions

from services.analytics.app import create_server
from services.analytics.settings import AnalyticsSettings
from services.common.logs import setup_logging
from services.common.redis import EmbeddedRedis, connect
from services.common.server import run_until_signal, start_metrics_endpoint

log = logging.getLogger(__name__)


async def wait_for_redis(core, timeout: float = 60.0) -> None:
    """Stay NOT_SERVING until Redis answers (it may still be starting or loading its AOF)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        try:
            await core.ping()
            return
        except redis.exceptions.ConnectionError:
            if asyncio.get_running_loop().time() > deadline:
                raise
            log.warning("waiting for redis")
            await asyncio.sleep(0.5)


async def main() -> None:
    settings = AnalyticsSettings()
    setup_logging(settings.log_level)
    embedded = None if settings.redis_url else EmbeddedRedis()
    redis = connect(settings.redis_url or embedded.url)
    server, core = create_server(settings, redis)
    start_metrics_endpoint(settings)
    await server.start()
    try:
        await wait_for_redis(core)
        await server.set_ready()
        await run_until_signal(server)
    finally:
        await redis.aclose()
        if embedded:
            embedded.close()


if __name__ == "__main__":
    asyncio.run(main())
