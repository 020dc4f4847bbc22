"""Entry point: python -m services.activelearning"""

import asyncio
from contextlib import AsyncExitStack

import redis.asyncio as aioredis

from services.activelearning.app import create_server
from services.activelearning.settings import ActiveLearningSettings
from services.common.channels import open_channel
from services.common.runner import Service, run_service


async def open_service(
    settings: ActiveLearningSettings, redis: aioredis.Redis, resources: AsyncExitStack
) -> Service:
    channels = {
        f"{name}_channel": await resources.enter_async_context(open_channel(addr))
        for name, addr in (
            ("analytics", settings.analytics_addr),
            ("experiments", settings.experiments_addr),
            ("inference", settings.inference_addr),
        )
        if addr
    }
    server, core = create_server(settings, redis, **channels)
    if core.forwarder is not None:
        core.forwarder.start()
        # Released before the channels: queued feedback is sent on them first.
        resources.push_async_callback(core.forwarder.close)
    core.start()
    resources.push_async_callback(core.close)
    return Service(server)


if __name__ == "__main__":
    asyncio.run(run_service(ActiveLearningSettings(), open_service))
