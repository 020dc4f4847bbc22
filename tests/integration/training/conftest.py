"""A real training gRPC server (and an experiments server) on free ports, on its own Redis
database of the session's redis-server, against the session's real inference server.

The server runs no embedded workers: tests that train start a Worker (in process, or a
`python -m services.training.worker` process) so that jobs other tests leave queued are
never trained by surprise.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import redis.asyncio as aioredis

from loraplex.training.v1 import training_service_pb2_grpc as pb_grpc
from services.common.channels import open_channel
from services.common.redis import connect, is_cluster_url
from services.common.server import Server
from services.experiments.app import create_server as create_experiments
from services.experiments.settings import ExperimentsSettings
from services.training.app import TrainingApp, create_server
from services.training.settings import TrainingSettings
from services.training.worker import Worker
from tests.helpers import database_url


@dataclass
class TrainingServers:
    server: Server
    app: TrainingApp
    settings: TrainingSettings
    redis_url: str
    inference_addr: str
    experiments: Server


@pytest.fixture(scope="session")
def training_redis_url(redis_url: str) -> str:
    return database_url(redis_url, 1)


@pytest.fixture(scope="session")
async def training_servers(
    training_redis_url: str, redis_url: str, inference, tmp_path_factory
) -> AsyncIterator[TrainingServers]:
    inference_server, _ = inference
    inference_addr = f"127.0.0.1:{inference_server.port}"
    exp_redis = connect(redis_url)
    experiments, store = create_experiments(
        ExperimentsSettings(port=0, redis_url=redis_url, shutdown_grace_seconds=0.5), exp_redis
    )
    await experiments.start()
    await experiments.set_ready()
    redis = connect(training_redis_url)
    if not is_cluster_url(training_redis_url):  # on a cluster: everyone's one database
        await redis.flushdb()
    settings = TrainingSettings(
        port=0,
        redis_url=training_redis_url,
        inference_addr=inference_addr,
        experiments_addr=f"127.0.0.1:{experiments.port}",
        training_dir=Path(tmp_path_factory.mktemp("training-work")),
        embedded_workers=0,
        lease_seconds=3,
        heartbeat_seconds=0.5,
        poll_seconds=0.2,
        checkpoint_steps=3,
        watch_poll_seconds=0.1,
        shutdown_grace_seconds=0.5,
    )
    channels = [open_channel(inference_addr), open_channel(settings.experiments_addr)]
    server, app = create_server(
        settings, redis, inference_channel=channels[0], experiments_channel=channels[1]
    )
    await server.start()
    app.start()
    await server.set_ready()
    yield TrainingServers(server, app, settings, training_redis_url, inference_addr, experiments)
    await server.stop()
    await app.close()
    for channel in channels:
        await channel.close()
    await redis.aclose()
    await experiments.stop()
    store.close()
    await exp_redis.aclose()


@pytest.fixture(scope="session")
async def training_stub(training_servers) -> AsyncIterator[pb_grpc.TrainingServiceStub]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{training_servers.server.port}") as chan:
        yield pb_grpc.TrainingServiceStub(chan)


@pytest.fixture
async def worker(training_servers) -> AsyncIterator[Worker]:
    """An in-process worker for the duration of one test."""
    redis: aioredis.Redis = connect(training_servers.redis_url)
    channel = open_channel(training_servers.inference_addr)
    w = Worker(training_servers.settings, redis, channel, name="test-worker")
    w.start()
    yield w
    await w.close()
    await channel.close()
    await redis.aclose()
