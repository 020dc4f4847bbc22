"""Entry point: python -m services.inference"""

import asyncio
from contextlib import AsyncExitStack

import redis.asyncio as aioredis

from services.common.runner import Service, run_service
from services.inference.app import create_server
from services.inference.settings import InferenceSettings


async def open_service(
    settings: InferenceSettings, redis: aioredis.Redis, resources: AsyncExitStack
) -> Service:
    server, core = create_server(settings, redis)
    resources.callback(core.close)  # the scheduler's model thread and the swap listener
    return Service(server, warm_up=core.start)


if __name__ == "__main__":
    asyncio.run(run_service(InferenceSettings(), open_service))
