"""The experiments service on a synchronous gRPC server with a thread pool (`server_mode:
sync`), for Assign throughput.

Measured side by side on the development box (bench/bench_experiments.py), grpc.aio's own
machinery is most of an Assign's CPU; with a few worker threads (sync_threads, default 4;
more threads contend for the GIL and cost more than they bring) this server spends ~30%
less CPU per Assign. Assign runs entirely on the worker thread (definition from the store's
cache, hashing, one blocking Redis round trip on the thread's own connection); every other
RPC, and a definition-cache miss, runs as a coroutine on the process's event loop (the one
`run_service` runs), so the domain layer stays the same async code as under grpc.aio. Every
in-flight RPC holds a worker thread until it returns: a slow GetResults (e.g. waiting for
the analytics service) delays Assigns behind it, which is why grpc.aio stays the default.

It offers what services.common.server.Server offers — health (NOT_SERVING until ready),
reflection, error mapping to status codes with ErrorInfo details, the same Prometheus
metrics, graceful stop — behind the same async start / set_ready / stop interface.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from grpc_status.rpc_status import GRPC_DETAILS_METADATA_KEY

from loraplex.experiments.v1 import experiments_service_pb2_grpc as pb_grpc
from services.common.errors import LoraplexError
from services.common.server import HANDLED, HANDLING_SECONDS, MAX_MESSAGE_BYTES, _status_details
from services.experiments.servicer import SERVICE_NAME, ExperimentsServicer, assignment_to_pb
from services.experiments.settings import ExperimentsSettings

log = logging.getLogger(__name__)


class _Interceptor(grpc.ServerInterceptor):
    """services.common.server.ServiceInterceptor for a synchronous server (unary calls)."""

    def __init__(self) -> None:
        self._handlers: dict[str, grpc.RpcMethodHandler] = {}

    def intercept_service(self, continuation, handler_call_details):
        method_path = handler_call_details.method
        wrapped = self._handlers.get(method_path)
        if wrapped is not None:
            return wrapped
        handler = continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler
        _, service, method = method_path.split("/")
        inner = handler.unary_unary
        handled = {code: HANDLED.labels(service, method, code.name) for code in grpc.StatusCode}
        seconds = HANDLING_SECONDS.labels(service, method)

        def unary_unary(request, context):
            start = time.perf_counter()
            code = grpc.StatusCode.OK
            try:
                return inner(request, context)
            except LoraplexError as err:
                code = err.code
                context.set_trailing_metadata(((GRPC_DETAILS_METADATA_KEY, _status_details(err)),))
                context.abort(err.code, err.message)
            except Exception:
                code = grpc.StatusCode.INTERNAL
                log.exception("unhandled error in %s/%s", service, method)
                context.abort(grpc.StatusCode.INTERNAL, "internal error")
            finally:
                handled[code].inc()
                seconds.observe(time.perf_counter() - start)

        wrapped = grpc.unary_unary_rpc_method_handler(
            unary_unary, handler.request_deserializer, handler.response_serializer
        )
        self._handlers[method_path] = wrapped
        return wrapped


class SyncExperimentsServicer(pb_grpc.ExperimentsServiceServicer):
    """Assign on the calling thread; everything else on the event loop."""

    def __init__(self, servicer: ExperimentsServicer) -> None:
        self.aio = servicer
        self.loop: asyncio.AbstractEventLoop | None = None  # set by SyncServer.start()

    def _run(self, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result()

    def Assign(self, request, context):
        result = self.aio.store.assign_blocking(
            request.tenant, request.experiment_key, request.unit_id, self.loop
        )
        return assignment_to_pb(result, self.aio.variant_protos(result.experiment))

    def CreateExperiment(self, request, context):
        return self._run(self.aio.CreateExperiment(request, context))

    def GetExperiment(self, request, context):
        return self._run(self.aio.GetExperiment(request, context))

    def ListExperiments(self, request, context):
        return self._run(self.aio.ListExperiments(request, context))

    def UpdateExperiment(self, request, context):
        return self._run(self.aio.UpdateExperiment(request, context))

    def RecordOutcomes(self, request, context):
        return self._run(self.aio.RecordOutcomes(request, context))

    def GetResults(self, request, context):
        return self._run(self.aio.GetResults(request, context))


class SyncServer:
    """Not started: `await server.start()` (from the event loop the store uses), then
    `await server.set_ready()`; `await server.stop()` drains within the grace period."""

    def __init__(self, settings: ExperimentsSettings, servicer: ExperimentsServicer) -> None:
        self.settings = settings
        self.servicer = SyncExperimentsServicer(servicer)
        self.grpc = grpc.server(
            ThreadPoolExecutor(max_workers=settings.sync_threads, thread_name_prefix="grpc"),
            interceptors=[_Interceptor()],
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ],
        )
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc)
        pb_grpc.add_ExperimentsServiceServicer_to_server(self.servicer, self.grpc)
        reflection.enable_server_reflection(
            [SERVICE_NAME, reflection.SERVICE_NAME, health.SERVICE_NAME], self.grpc
        )
        self.port = self.grpc.add_insecure_port(f"{settings.host}:{settings.port}")
        if self.port == 0:
            raise RuntimeError(f"could not bind {settings.host}:{settings.port}")

    def _set_all(self, status: int) -> None:
        for name in ("", SERVICE_NAME):
            self.health.set(name, status)

    async def start(self) -> None:
        self.servicer.loop = asyncio.get_running_loop()
        self._set_all(health_pb2.HealthCheckResponse.NOT_SERVING)
        self.grpc.start()
        log.info(
            "grpc server listening",
            extra={"port": self.port, "services": [SERVICE_NAME], "mode": "sync"},
        )

    async def set_ready(self) -> None:
        self._set_all(health_pb2.HealthCheckResponse.SERVING)
        log.info("ready", extra={"services": [SERVICE_NAME]})

    async def stop(self) -> None:
        self.health.enter_graceful_shutdown()
        done = self.grpc.stop(self.settings.shutdown_grace_seconds)
        # in-flight calls may wait on this loop: keep it running while they drain
        await asyncio.get_running_loop().run_in_executor(None, done.wait)
        self.servicer.aio.store.close()
