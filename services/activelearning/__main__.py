"""Entry point: python -m services.activelearning"""

import asyncio

import redis.asyncio as aioredis

from services.activelearning.app import create_server
from services.activelearning.core import ActiveLearningCore
from services.activelearning.settings import ActiveLearningSettings
from services.common.channels import open_channel
from services.common.runner import run_service
from services.common.server import Server


def _create(
    settings: ActiveLearningSettings, redis: aioredis.Redis
) -> tuple[Server, ActiveLearningCore]:
    # Called inside the running event loop, where the channels must be opened.
    channels = {
        f"{name}_channel": open_channel(addr)
        for name, addr in (
            ("analytics", settings.analytics_addr),
            ("experiments", settings.experiments_addr),
            ("inference", settings.inference_addr if settings.embed_with_model else None),
        )
        if addr
    }
    return create_server(settings, redis, **channels)


async def _warm_up(core: ActiveLearningCore) -> None:
    if core.forwarder is not None:
        core.forwarder.start()
    core.start()


if __name__ == "__main__":
    asyncio.run(run_service(ActiveLearningSettings(), _create, warm_up=_warm_up))
