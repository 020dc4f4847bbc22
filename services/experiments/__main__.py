"""Entry point: python -m services.experiments"""

import asyncio
from contextlib import AsyncExitStack

import redis.asyncio as aioredis

from services.common.runner import Service, run_service
from services.experiments.app import create_server
from services.experiments.settings import ExperimentsSettings


async def open_service(
    settings: ExperimentsSettings, redis: aioredis.Redis, resources: AsyncExitStack
) -> Service:
    server, store = create_server(settings, redis)
    resources.callback(store.close)  # its own Assign connections
    return Service(server)


if __name__ == "__main__":
    asyncio.run(run_service(ExperimentsSettings(), open_service))
