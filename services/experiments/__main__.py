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
    # Definition writes made through other replicas reach Assign at once, not after the
    # definition cache's seconds.
    store.assigner.start()
    resources.push_async_callback(store.assigner.close)
    return Service(server)


if __name__ == "__main__":
    asyncio.run(run_service(ExperimentsSettings(), open_service))
