"""Training workers: claim queued jobs, train them, register the result as a candidate.

A Worker runs up to `worker_concurrency` jobs at once, each in a thread (training is
blocking), with one asyncio loop that claims jobs (round-robin over tenants, at most
`max_running_per_tenant` of a tenant's jobs running across all workers), renews their
leases, and puts back the jobs of workers that died (their leases expired). A job put back
resumes from its last checkpoint in <training_dir>/<job id>/checkpoints, wherever it runs next.

`python -m services.training.worker` runs a standalone worker process (more capacity, or
training on other machines that share training_dir and Redis); the service also runs
`embedded_workers` workers in its own process.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import socket
import threading
import time
import uuid
from pathlib import Path

import grpc
import redis.asyncio as aioredis

from loraplex.common.v1 import common_pb2
from loraplex.inference.v1 import inference_service_pb2 as ipb
from loraplex.inference.v1 import inference_service_pb2_grpc as ipb_grpc
from services.common.errors import LoraplexError
from services.training.candidates import CandidateRecord, CandidateStore
from services.training.data import Splits
from services.training.jobs import CANCELLED, FAILED, SUCCEEDED, Job, JobStore, Lease
from services.training.params import Method, TrainingParams
from services.training.settings import TrainingSettings

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"

log = logging.getLogger(__name__)


class Worker:
    def __init__(
        self,
        settings: TrainingSettings,
        redis: aioredis.Redis,
        inference_channel: grpc.aio.Channel,
        name: str = "",
    ) -> None:
        self.settings = settings
        self.jobs = JobStore(redis, settings.retention_seconds)
        self.candidates = CandidateStore(redis, settings.retention_seconds)
        self.inference = ipb_grpc.InferenceServiceStub(inference_channel)
        self.name = name or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.running: dict[str, asyncio.Task] = {}
        self._task: asyncio.Task | None = None
        self._turn = 0

    def start(self) -> None:
        self._task = asyncio.create_task(self.run_forever(), name=f"training worker {self.name}")

    def cancel(self) -> None:
        """Stop claiming; running jobs stop at their next step and keep their leases, which
        expire, so another worker resumes them from their checkpoints."""
        for task in [self._task, *self.running.values()]:
            if task is not None:
                task.cancel()

    async def close(self) -> None:
        """cancel(), then wait for the tasks to end."""
        self.cancel()
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for task in list(self.running.values()):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def run_forever(self) -> None:
        while True:
            try:
                await self.poll_once()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("training worker poll failed")
            await asyncio.sleep(self.settings.poll_seconds)

    async def poll_once(self) -> None:
        s = self.settings
        tenants = await self.jobs.tenants()
        for tenant in tenants:
            await self.jobs.reap(tenant, s.max_attempts)
        if not tenants:
            return
        # Round-robin: each poll starts one tenant further, so no tenant starves the rest.
        self._turn = (self._turn + 1) % len(tenants)
        order = tenants[self._turn :] + tenants[: self._turn]
        for tenant in order:
            if len(self.running) >= s.worker_concurrency:
                return
            lease = await self.jobs.claim(
                tenant, self.name, s.lease_seconds, s.max_running_per_tenant
            )
            if lease is not None:
                task = asyncio.create_task(self._run(lease), name=f"job {lease.job_id}")
                self.running[lease.job_id] = task
                task.add_done_callback(lambda _t, j=lease.job_id: self.running.pop(j, None))

    # -- one job ----------------------------------------------------------------------------

    async def _run(self, lease: Lease) -> None:
        stop = threading.Event()
        lost = threading.Event()
        heartbeat = asyncio.create_task(self._heartbeat(lease, stop, lost))
        try:
            job = await self.jobs.get(lease.tenant, lease.job_id)
            log.info(
                "training job started",
                extra={"job": job.id, "tenant": job.tenant, "attempt": job.attempts},
            )
            await self._train(job, lease, stop, lost)
        except asyncio.CancelledError:
            stop.set()  # the worker is closing: the lease expires, another worker resumes
            raise
        except LoraplexError as err:
            if await self.jobs.finish(
                lease, FAILED, error_reason=err.reason, error_message=err.message
            ):
                shutil.rmtree(self.settings.training_dir / lease.job_id, ignore_errors=True)
        except Exception:
            log.exception("training job failed", extra={"job": lease.job_id})
            if await self.jobs.finish(
                lease, FAILED, error_reason="INTERNAL", error_message="training failed"
            ):
                shutil.rmtree(self.settings.training_dir / lease.job_id, ignore_errors=True)
        finally:
            heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await heartbeat

    async def _heartbeat(self, lease: Lease, stop: threading.Event, lost: threading.Event):
        s = self.settings
        while True:
            await asyncio.sleep(s.heartbeat_seconds)
            try:
                status = await self.jobs.heartbeat(lease, s.lease_seconds)
            except Exception:
                log.warning("heartbeat failed", extra={"job": lease.job_id})
                continue
            if status == -1:
                lost.set()
                stop.set()
                return
            if status == 1:
                stop.set()

    async def _train(
        self, job: Job, lease: Lease, stop: threading.Event, lost: threading.Event
    ) -> None:
        from services.training import trainer  # imports torch, TRL: only where jobs run

        s = self.settings
        job_dir = s.training_dir / job.id
        job_dir.mkdir(parents=True, exist_ok=True)
        splits = Splits.from_json(await self.jobs.read_data(job.tenant, job.id))
        init_dir = None
        if job.init_adapter.get("name"):
            init_dir = await self._fetch_init(job, job_dir / "init")
        loop = asyncio.get_running_loop()
        pending: dict = {}

        def report(progress: dict) -> None:  # called from the training thread
            pending["progress"] = progress
            loop.call_soon_threadsafe(
                lambda: asyncio.ensure_future(self._flush_progress(lease, pending))
            )

        spec = trainer.RunSpec(
            model_dir=s.model_dir,
            job_dir=job_dir,
            method=Method(job.method),
            params=TrainingParams.from_dict(job.params),
            splits=splits,
            checkpoint_steps=s.checkpoint_steps,
            init_dir=init_dir,
            base_model_name=s.model_dir.name,
        )
        started = time.time()
        result = await asyncio.to_thread(
            trainer.run, spec, trainer.Hooks(report=report, should_stop=stop.is_set)
        )
        if lost.is_set():
            log.warning(
                "training job lost its lease; left to its new worker", extra={"job": job.id}
            )
            return
        if result.stopped:
            fresh = await self.jobs.get(job.tenant, job.id)
            if fresh.cancel_requested:
                await self.jobs.finish(lease, CANCELLED)
                shutil.rmtree(job_dir, ignore_errors=True)
            return  # else: closing; the lease expires and the job resumes elsewhere
        await self._register(job, lease, result, started)
        shutil.rmtree(job_dir, ignore_errors=True)

    async def _flush_progress(self, lease: Lease, pending: dict) -> None:
        progress = pending.pop("progress", None)
        if progress is not None:
            with contextlib.suppress(Exception):
                await self.jobs.update(lease, progress=progress)

    async def _fetch_init(self, job: Job, directory: Path) -> Path:
        """The adapter version the job continues from, as PEFT files on disk."""
        reply = await self.inference.GetAdapter(
            ipb.GetAdapterRequest(
                tenant=job.tenant,
                adapter=common_pb2.AdapterRef(
                    name=job.init_adapter["name"], version=job.init_adapter["version"]
                ),
                include_files=True,
            )
        )
        directory.mkdir(parents=True, exist_ok=True)
        names = {CONFIG_FILE, WEIGHTS_FILE}  # the only names ever written: never a path
        for f in reply.files:
            if f.name in names:
                (directory / f.name).write_bytes(f.content)
        return directory

    async def _register(self, job: Job, lease: Lease, result, started: float) -> None:
        """Register the candidate, then record it and finish the job in one fenced step; if
        that step is refused (the lease was lost meanwhile), the registration is undone."""
        reply = await self.inference.RegisterAdapter(
            ipb.RegisterAdapterRequest(
                tenant=job.tenant,
                name=job.adapter,
                files=[ipb.AdapterFile(name=k, content=v) for k, v in result.files.items()],
                candidate=True,
            )
        )
        version = reply.adapter.version
        record = {
            **result.record,
            "method": job.method,
            "data_fingerprint": job.data_fingerprint,
            "train_examples": job.train_examples,
            "heldout_examples": job.heldout_examples,
            "init_adapter": job.init_adapter,
            "resumes": max(job.attempts - 1, 0),
            "base_model": self.settings.model_dir.name,
            "job_seconds": time.time() - (job.started or started),
        }
        candidate = CandidateRecord(job.tenant, job.adapter, version, job.id, record)
        keys = self.candidates.keys(job.tenant, job.adapter, version)
        done = await self.jobs.finish(
            lease,
            SUCCEEDED,
            candidate=(*keys, candidate.to_json()),
            record=record,
            candidate_version=version,
        )
        if not done:
            log.warning("lease lost before the job finished; undoing its registration")
            await self.inference.DiscardCandidate(
                ipb.DiscardCandidateRequest(tenant=job.tenant, name=job.adapter, version=version)
            )
            return
        await self.candidates.expire(job.tenant, job.adapter, version)
        log.info(
            "training job succeeded",
            extra={"job": job.id, "adapter": job.adapter, "version": version},
        )


def set_torch_threads(settings: TrainingSettings) -> None:
    if settings.torch_threads:
        import torch

        torch.set_num_threads(settings.torch_threads)


async def main(settings: TrainingSettings) -> None:
    """A standalone worker: until SIGTERM/SIGINT, then its running jobs stop (their leases
    expire and another worker resumes them)."""
    import signal

    from services.common.channels import open_channel
    from services.common.logs import setup_logging
    from services.common.redis import connect

    setup_logging(settings.log_level)
    if not settings.redis_url:
        raise SystemExit("a standalone training worker needs REDIS_URL (the service's Redis)")
    set_torch_threads(settings)
    redis = connect(settings.redis_url)
    channel = open_channel(settings.inference_addr)
    worker = Worker(settings, redis, channel)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    worker.start()
    log.info("training worker started", extra={"worker": worker.name})
    try:
        await stop.wait()
    finally:
        await worker.close()
        await channel.close()
        await redis.aclose()


if __name__ == "__main__":
    asyncio.run(main(TrainingSettings()))
