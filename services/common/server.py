"""gRPC server machinery shared by every service.

create_server() builds a grpc.aio server with the standard health service (NOT_SERVING
until the caller marks it ready), reflection, and one interceptor that maps domain errors
to status codes and records Prometheus metrics. services.common.runner runs one until SIGTERM.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import prometheus_client
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from grpc_status.rpc_status import GRPC_DETAILS_METADATA_KEY

from services.common.errors import ERROR_DOMAIN, LoraplexError, domain_error
from services.common.settings import ServiceSettings

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 256 * 1024 * 1024  # adapters are uploaded in one message

HANDLED = prometheus_client.Counter(
    "loraplex_grpc_server_handled_total",
    "RPCs completed on the server, by status code.",
    ["grpc_service", "grpc_method", "grpc_code"],
)
HANDLING_SECONDS = prometheus_client.Histogram(
    "loraplex_grpc_server_handling_seconds",
    "Time to handle an RPC on the server.",
    ["grpc_service", "grpc_method"],
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)


@dataclass(frozen=True)
class ServiceSpec:
    """One gRPC service to mount: its full proto name, servicer and generated add-function."""

    name: str
    servicer: Any
    add_to_server: Callable[[Any, grpc.aio.Server], None]


# Error texts often quote what the caller sent; a 7 KB identifier quoted twice would
# overflow gRPC's 8 KB trailer limit and turn a clear refusal into RESOURCE_EXHAUSTED.
MAX_ERROR_TEXT = 512


def _bounded(text: str) -> str:
    return text if len(text) <= MAX_ERROR_TEXT else text[: MAX_ERROR_TEXT - 1] + "…"


def _status_details(err: LoraplexError) -> bytes:
    metadata = {k: _bounded(v) for k, v in err.metadata.items()}
    info = error_details_pb2.ErrorInfo(reason=err.reason, domain=ERROR_DOMAIN, metadata=metadata)
    detail = any_pb2.Any()
    detail.Pack(info)
    message = _bounded(err.message)
    status = status_pb2.Status(code=err.code.value[0], message=message, details=[detail])
    return status.SerializeToString()


class ServiceInterceptor(grpc.aio.ServerInterceptor):
    """Maps LoraplexError to its status (with ErrorInfo), and a Redis outage to UNAVAILABLE
    (REDIS_UNAVAILABLE) for every service; anything else becomes a generic INTERNAL with the
    traceback logged, never str(err) sent to the caller."""

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        _, service, method = handler_call_details.method.split("/")

        async def abort(context: grpc.aio.ServicerContext, err: Exception) -> None:
            known = domain_error(err)
            if known is None:
                log.exception("unhandled error in %s/%s", service, method)
                await context.abort(grpc.StatusCode.INTERNAL, "internal error")
            trailing = ((GRPC_DETAILS_METADATA_KEY, _status_details(known)),)
            await context.abort(known.code, _bounded(known.message), trailing_metadata=trailing)

        def record(start: float, context: grpc.aio.ServicerContext) -> None:
            code = context.code() or grpc.StatusCode.OK
            name = code.name if isinstance(code, grpc.StatusCode) else str(code)
            HANDLED.labels(service, method, name).inc()
            HANDLING_SECONDS.labels(service, method).observe(time.perf_counter() - start)

        if handler.unary_unary:
            inner = handler.unary_unary

            async def unary_unary(request, context):
                start = time.perf_counter()
                try:
                    return await inner(request, context)
                except grpc.aio.AbortError:
                    raise
                except Exception as err:
                    await abort(context, err)
                finally:
                    record(start, context)

            return grpc.unary_unary_rpc_method_handler(
                unary_unary, handler.request_deserializer, handler.response_serializer
            )
        if handler.unary_stream:
            inner_stream = handler.unary_stream

            async def unary_stream(request, context):
                start = time.perf_counter()
                try:
                    async for item in inner_stream(request, context):
                        yield item
                except grpc.aio.AbortError:
                    raise
                except Exception as err:
                    await abort(context, err)
                finally:
                    record(start, context)

            return grpc.unary_stream_rpc_method_handler(
                unary_stream, handler.request_deserializer, handler.response_serializer
            )
        return handler


class Server:
    """A started-or-not grpc.aio server plus its health servicer."""

    def __init__(self, settings: ServiceSettings, services: Sequence[ServiceSpec]) -> None:
        self.settings = settings
        self.services = list(services)
        self.grpc = grpc.aio.server(
            interceptors=[ServiceInterceptor()],
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ],
        )
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc)
        for spec in self.services:
            spec.add_to_server(spec.servicer, self.grpc)
        names = [s.name for s in self.services]
        reflection.enable_server_reflection(
            [*names, reflection.SERVICE_NAME, health.SERVICE_NAME], self.grpc
        )
        self.port = self.grpc.add_insecure_port(f"{settings.host}:{settings.port}")
        if self.port == 0:
            raise RuntimeError(f"could not bind {settings.host}:{settings.port}")

    async def start(self) -> None:
        await self._set_all(health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.grpc.start()
        log.info(
            "grpc server listening",
            extra={"port": self.port, "services": [s.name for s in self.services]},
        )

    async def set_ready(self) -> None:
        await self._set_all(health_pb2.HealthCheckResponse.SERVING)
        log.info("ready", extra={"services": [s.name for s in self.services]})

    async def stop(self) -> None:
        await self.health.enter_graceful_shutdown()
        await self.grpc.stop(self.settings.shutdown_grace_seconds)

    async def _set_all(self, status: int) -> None:
        for name in ["", *(s.name for s in self.services)]:
            await self.health.set(name, status)


def start_metrics_endpoint(settings: ServiceSettings) -> None:
    if settings.metrics_port:
        prometheus_client.start_http_server(settings.metrics_port, addr=settings.host)


def stop_on_signal() -> asyncio.Event:
    """An event set by SIGTERM or SIGINT (handlers installed now, inside the running loop)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop


async def run_until_signal(server: Server) -> None:
    """Serve until SIGTERM/SIGINT, then drain in-flight RPCs within the grace period."""
    await stop_on_signal().wait()
    log.info("shutting down", extra={"grace_seconds": server.settings.shutdown_grace_seconds})
    await server.stop()
