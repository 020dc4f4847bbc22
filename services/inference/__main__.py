"""Entry point: python -m services.inference"""

from __future__ import annotations

import asyncio

from services.common.logs import setup_logging
from services.common.redis import EmbeddedRedis, connect
from services.common.server import run_until_signal, start_metrics_endpoint
from services.inference.app import create_server
from services.inference.settings import InferenceSettings


async def main() -> None:
    settings = InferenceSettings()
    setup_logging(settings.log_level)
    embedded = None if settings.redis_url else EmbeddedRedis()
    redis = connect(settings.redis_url or embedded.url)
    server, core = create_server(settings, redis)
    start_metrics_endpoint(settings)
    await server.start()
    try:
        await redis.ping()
        await core.start()
        await server.set_ready()
        await run_until_signal(server)
    finally:
        core.close()
        await redis.aclose()
        if embedded:
            embedded.close()


if __name__ == "__main__":
    asyncio.run(main())
