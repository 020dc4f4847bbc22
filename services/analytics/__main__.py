"""Entry point: python -m services.analytics"""

import asyncio
from contextlib import AsyncExitStack

import redis.asyncio as aioredis

from services.analytics.app import create_server
from services.analytics.settings import AnalyticsSettings
from services.common.runner import Service, run_service


async def open_service(
    settings: AnalyticsSettings, redis: aioredis.Redis, resources: AsyncExitStack
) -> Service:
    server, _ = create_server(settings, redis)  # holds nothing but the runner's Redis
    return Service(server)


if __name__ == "__main__":
    asyncio.run(run_service(AnalyticsSettings(), open_service))
