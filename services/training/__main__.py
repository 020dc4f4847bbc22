"""Entry point: python -m services.training"""

import asyncio
from contextlib import AsyncExitStack

import redis.asyncio as aioredis

from services.common.channels import open_channel
from services.common.runner import Service, run_service
from services.training.app import create_server
from services.training.settings import TrainingSettings
from services.training.worker import set_torch_threads


async def open_service(
    settings: TrainingSettings, redis: aioredis.Redis, resources: AsyncExitStack
) -> Service:
    channels = {
        f"{name}_channel": await resources.enter_async_context(open_channel(addr))
        for name, addr in (
            ("inference", settings.inference_addr),
            ("activelearning", settings.activelearning_addr),
            ("experiments", settings.experiments_addr),
        )
        if addr
    }
    server, app = create_server(settings, redis, **channels)

    async def warm_up() -> None:
        set_torch_threads(settings)
        app.start()
        # Released before the channels: the workers stop, and their jobs' leases expire so
        # that another worker resumes them from their last checkpoints.
        resources.push_async_callback(app.close)

    return Service(server, warm_up)


if __name__ == "__main__":
    asyncio.run(run_service(TrainingSettings(), open_service))
