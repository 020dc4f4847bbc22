"""Builds the active-learning gRPC server: the domain core behind its servicer."""

from __future__ import annotations

import asyncio
import contextlib

import grpc
import redis.asyncio as aioredis

from loraplex.activelearning.v1 import activelearning_service_pb2_grpc as pb_grpc
from services.activelearning.core import ActiveLearningCore
from services.activelearning.embedder import ModelEmbedder
from services.activelearning.forward import FeedbackForwarder
from services.activelearning.metrics import COLLECTOR
from services.activelearning.sampler import Sampler
from services.activelearning.servicer import SERVICE_NAME, ActiveLearningServicer
from services.activelearning.settings import ActiveLearningSettings
from services.common.server import Server, ServiceSpec


def create_server(
    settings: ActiveLearningSettings,
    redis: aioredis.Redis,
    *,
    analytics_channel: grpc.aio.Channel | None = None,
    experiments_channel: grpc.aio.Channel | None = None,
    inference_channel: grpc.aio.Channel | None = None,
) -> tuple[Server, ActiveLearningCore]:
    """Not started: `await server.start()`, `core.forwarder.start()` when there is one,
    `core.start()` (background model embeddings, with an inference channel and
    embed_with_model), then (once Redis answers) `await server.set_ready()`. With an
    inference channel the sampling-based methods are available."""
    forwarder = None
    if analytics_channel is not None or experiments_channel is not None:
        forwarder = FeedbackForwarder(
            analytics_channel,
            experiments_channel,
            flush_interval_seconds=settings.feedback_flush_seconds,
        )
    embedder = sampler = None
    if inference_channel is not None and settings.embed_with_model:
        embedder = ModelEmbedder(
            inference_channel,
            settings.embedding_dim,
            timeout_seconds=settings.embed_timeout_seconds,
            retry_seconds=settings.embed_retry_seconds,
        )
    if inference_channel is not None:
        sampler = Sampler(
            inference_channel,
            count=settings.sample_count,
            temperature=settings.sample_temperature,
            max_new_tokens=settings.sample_max_new_tokens,
            concurrency=settings.sample_concurrency,
            timeout_seconds=settings.sample_timeout_seconds,
        )
    core = ActiveLearningCore(settings, redis, forwarder, embedder, sampler)
    with contextlib.suppress(RuntimeError):  # no running loop (a test): no queue gauge
        COLLECTOR.track(core.queue, asyncio.get_running_loop())
    spec = ServiceSpec(
        SERVICE_NAME,
        ActiveLearningServicer(core),
        pb_grpc.add_ActiveLearningServiceServicer_to_server,
    )
    return Server(settings, [spec]), core
