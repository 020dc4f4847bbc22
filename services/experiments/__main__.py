"""Entry point: python -m services.experiments"""

from __future__ import annotations

import asyncio

from services.common.logs import setup_logging
from services.common.redis import EmbeddedRedis, connect
from services.common.server import run_until_signal, start_metrics_endpoint
from services.experiments.app import create_server
from services.experiments.settings import ExperimentsSettings


async def main() -> None:
    settings = ExperimentsSettings()
    setup_logging(settings.log_level)
    embedded = None if settings.redis_url else EmbeddedRedis()
    redis = connect(settings.redis_url or embedded.url)
    server, _ = create_server(settings, redis)
    start_metrics_endpoint(settings)
    await server.start()
    try:
        await redis.ping()
        await server.set_ready()
        await run_until_signal(server)
    finally:
        await redis.aclose()
        if embedded:
            embedded.close()


if __name__ == "__main__":
    asyncio.run(main())
