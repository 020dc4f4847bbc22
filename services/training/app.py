"""Builds the training gRPC server: the domain core behind its servicer, and the workers
that run inside the service process."""

from __future__ import annotations

import grpc
import redis.asyncio as aioredis

from loraplex.training.v1 import training_service_pb2_grpc as pb_grpc
from services.common.server import Server, ServiceSpec
from services.training.core import TrainingCore
from services.training.servicer import SERVICE_NAME, TrainingServicer
from services.training.settings import TrainingSettings
from services.training.worker import Worker


class TrainingApp:
    """The core and its embedded workers, started and closed together."""

    def __init__(self, core: TrainingCore, workers: list[Worker]) -> None:
        self.core = core
        self.workers = workers

    def start(self) -> None:
        self.core.start()
        for worker in self.workers:
            worker.start()

    def cancel(self) -> None:
        """Synchronous stop (run_service's close hook): the workers' jobs keep their leases,
        which expire, and other workers resume them from their last checkpoints."""
        for worker in self.workers:
            worker.cancel()
        self.core.cancel()

    async def close(self) -> None:
        for worker in self.workers:
            await worker.close()
        await self.core.close()


def create_server(
    settings: TrainingSettings,
    redis: aioredis.Redis,
    *,
    inference_channel: grpc.aio.Channel,
    activelearning_channel: grpc.aio.Channel | None = None,
    experiments_channel: grpc.aio.Channel | None = None,
) -> tuple[Server, TrainingApp]:
    """Not started: `await server.start()`, `app.start()` (workers and the auto-promotion
    check), then (once Redis answers) `await server.set_ready()`."""
    core = TrainingCore(
        settings, redis, inference_channel, activelearning_channel, experiments_channel
    )
    workers = [Worker(settings, redis, inference_channel) for _ in range(settings.embedded_workers)]
    spec = ServiceSpec(
        SERVICE_NAME, TrainingServicer(core), pb_grpc.add_TrainingServiceServicer_to_server
    )
    return Server(settings, [spec]), TrainingApp(core, workers)
