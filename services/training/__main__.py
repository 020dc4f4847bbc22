"""Entry point: python -m services.training"""

import asyncio

import redis.asyncio as aioredis

from services.common.channels import open_channel
from services.common.runner import run_service
from services.common.server import Server
from services.training.app import TrainingApp, create_server
from services.training.settings import TrainingSettings
from services.training.worker import set_torch_threads


def _create(settings: TrainingSettings, redis: aioredis.Redis) -> tuple[Server, TrainingApp]:
    # Called inside the running event loop, where the channels must be opened.
    optional = {
        f"{name}_channel": open_channel(addr)
        for name, addr in (
            ("activelearning", settings.activelearning_addr),
            ("experiments", settings.experiments_addr),
        )
        if addr
    }
    return create_server(
        settings, redis, inference_channel=open_channel(settings.inference_addr), **optional
    )


async def _warm_up(app: TrainingApp) -> None:
    set_torch_threads(app.core.settings)
    app.start()


if __name__ == "__main__":
    asyncio.run(
        run_service(TrainingSettings(), _create, warm_up=_warm_up, close=TrainingApp.cancel)
    )
