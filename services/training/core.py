"""The training service's domain layer (no gRPC server code): jobs, candidates, federation.

Everything a job needs is checked when it is created (parameters, the adapter it continues
from, the data, its held-out split), so bad input is refused at once and nothing is queued;
workers (services/training/worker.py) then train queued jobs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
import redis.asyncio as aioredis

from loraplex.activelearning.v1 import activelearning_service_pb2 as alpb
from loraplex.activelearning.v1 import activelearning_service_pb2_grpc as alpb_grpc
from loraplex.common.v1 import common_pb2
from loraplex.experiments.v1 import experiments_service_pb2 as xpb
from loraplex.experiments.v1 import experiments_service_pb2_grpc as xpb_grpc
from loraplex.inference.v1 import inference_service_pb2 as ipb
from loraplex.inference.v1 import inference_service_pb2_grpc as ipb_grpc
from services.common.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable
from services.common.keys import PLATFORM, key
from services.common.names import check_adapter_name, check_tenant
from services.training import data as datasets
from services.training.candidates import (
    CANDIDATE,
    DISCARDED,
    IN_EXPERIMENT,
    OPEN,
    PROMOTED,
    CandidateRecord,
    CandidateStore,
    experiment_key_for,
)
from services.training.federation import (
    FederatedAdapter,
    FederationConfig,
    LoraAdapter,
    LoRAFederation,
)
from services.training.jobs import QUEUED, Job, JobStore, new_job_id
from services.training.params import Method, parse_method, resolve_params
from services.training.remote import call
from services.training.settings import TrainingSettings

log = logging.getLogger(__name__)

FEEDBACK_FORMATS = {Method.SFT: alpb.DATASET_FORMAT_SFT, Method.DPO: alpb.DATASET_FORMAT_DPO}
_MEAN_METRICS = {"rating", "latency_ms", "completion_tokens"}
# Tenants that ever started an auto-promoting experiment (checked by check_auto_promotions).
AUTO_PROMOTE_TENANTS = key(PLATFORM, "training", "auto-promote-tenants")


@dataclass(frozen=True)
class DataSource:
    """kind "feedback" (the tenant's feedback export, optionally of one adapter's outputs
    and a time window) or "upload" (JSON Lines)."""

    kind: str
    jsonl: bytes = b""
    adapter: str = ""
    start: float | None = None
    end: float | None = None


@dataclass(frozen=True)
class Participant:
    tenant: str
    name: str
    version: int
    num_samples: int


class TrainingCore:
    def __init__(
        self,
        settings: TrainingSettings,
        redis: aioredis.Redis,
        inference_channel: grpc.aio.Channel,
        activelearning_channel: grpc.aio.Channel | None = None,
        experiments_channel: grpc.aio.Channel | None = None,
    ) -> None:
        self.settings = settings
        self.redis = redis
        self.jobs = JobStore(redis, settings.retention_seconds)
        self.candidates = CandidateStore(redis, settings.retention_seconds)
        self.inference = ipb_grpc.InferenceServiceStub(inference_channel)
        self.activelearning = (
            alpb_grpc.ActiveLearningServiceStub(activelearning_channel)
            if activelearning_channel
            else None
        )
        self.experiments = (
            xpb_grpc.ExperimentsServiceStub(experiments_channel) if experiments_channel else None
        )
        self._model_checked = False
        self._modules: set[str] | None = None
        self._auto_task: asyncio.Task | None = None

    async def ping(self) -> None:
        await self.redis.ping()

    # -- jobs -------------------------------------------------------------------------------

    async def _check_base_model(self) -> None:
        """The model trained on must be the one inference serves (else the adapters would
        not fit it)."""
        if self._model_checked:
            return
        info = await call(self.inference.GetModelInfo(ipb.GetModelInfoRequest()), "inference")
        if info.model_id != self.settings.model_dir.name:
            raise FailedPrecondition(
                f"training uses base model {self.settings.model_dir.name!r} but inference "
                f"serves {info.model_id!r}",
                reason="BASE_MODEL_MISMATCH",
            )
        self._model_checked = True

    def _linear_modules(self) -> set[str]:
        """Names of the base model's linear layers (e.g. q_proj), from its config alone: the
        model is built on the meta device, no weights loaded."""
        if self._modules is None:
            import torch
            from transformers import AutoConfig, AutoModelForCausalLM

            config = AutoConfig.from_pretrained(self.settings.model_dir)
            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(config)
            self._modules = {
                name.rsplit(".", 1)[-1]
                for name, module in model.named_modules()
                if isinstance(module, torch.nn.Linear) and name != "lm_head"
            }
        return self._modules

    async def _check_target_modules(self, modules: tuple[str, ...]) -> None:
        known = await asyncio.to_thread(self._linear_modules)
        unknown = sorted(set(modules) - known)
        if unknown:
            raise InvalidArgument(
                f"the base model has no linear layers named {', '.join(unknown)}; use some "
                f"of {', '.join(sorted(known))}",
                reason="UNKNOWN_TARGET_MODULE",
                field="target_modules",
            )

    async def _init_adapter(self, tenant: str, name: str, version: int) -> dict[str, Any]:
        """The adapter version a job continues from, pinned: {name, version, config}."""
        reply = await call(
            self.inference.GetAdapter(
                ipb.GetAdapterRequest(
                    tenant=tenant,
                    adapter=common_pb2.AdapterRef(name=name, version=version),
                    include_files=True,
                )
            ),
            "inference",
        )
        files = {f.name: f.content for f in reply.files}
        adapter = LoraAdapter.from_files(
            files["adapter_config.json"], files["adapter_model.safetensors"]
        )
        if adapter.base_model and adapter.base_model != self.settings.model_dir.name:
            raise InvalidArgument(
                f"adapter {name!r} was trained for base model {adapter.base_model!r}, not "
                f"{self.settings.model_dir.name!r}",
                reason="BASE_MODEL_MISMATCH",
            )
        return {"name": name, "version": reply.adapter.version, "config": adapter.config}

    async def _read_data(self, tenant: str, method: Method, source: DataSource) -> bytes:
        s = self.settings
        if source.kind == "upload":
            if not source.jsonl.strip():
                raise InvalidArgument("the uploaded dataset is empty", reason="EMPTY_DATASET")
            if len(source.jsonl) > s.max_dataset_bytes:
                raise InvalidArgument(
                    f"the dataset is larger than {s.max_dataset_bytes} bytes",
                    reason="DATASET_TOO_LARGE",
                )
            return source.jsonl
        if source.kind != "feedback":
            raise InvalidArgument(
                "name a data source: the tenant's feedback, or an uploaded JSONL dataset",
                reason="NO_DATA_SOURCE",
            )
        if self.activelearning is None:
            raise Unavailable(
                "feedback data needs the active-learning service (ACTIVELEARNING_ADDR)",
                reason="ACTIVELEARNING_DISABLED",
            )
        request = alpb.ExportDatasetRequest(
            tenant=tenant, format=FEEDBACK_FORMATS[method], adapter=source.adapter
        )
        if source.start is not None:
            request.start_time.FromNanoseconds(int(source.start * 1e9))
        if source.end is not None:
            request.end_time.FromNanoseconds(int(source.end * 1e9))
        reply = await call(self.activelearning.ExportDataset(request), "activelearning")
        if reply.rows == 0:
            what = "preference pairs" if method is Method.DPO else "accepted or corrected outputs"
            raise InvalidArgument(
                f"the tenant's feedback has no {what} to train {method} on",
                reason="DPO_WITHOUT_PAIRS" if method is Method.DPO else "EMPTY_DATASET",
            )
        if len(reply.jsonl) > s.max_dataset_bytes:
            raise InvalidArgument(
                "the feedback export is too large: narrow its time window",
                reason="DATASET_TOO_LARGE",
            )
        return reply.jsonl

    async def create_job(
        self,
        tenant: str,
        adapter: str,
        method: str,
        source: DataSource,
        params: dict[str, Any],
        init_name: str = "",
        init_version: int = 0,
    ) -> Job:
        s = self.settings
        check_tenant(tenant)
        check_adapter_name(adapter)
        chosen = parse_method(method)
        resolved = resolve_params(params, s)
        init: dict[str, Any] = {"name": "", "version": 0}
        if init_name:
            init = await self._init_adapter(tenant, check_adapter_name(init_name), init_version)
            config = init.pop("config")  # continuing keeps the adapter's own shape
            resolved = resolve_params(
                {
                    **params,
                    "rank": int(config["r"]),
                    "lora_alpha": float(config["lora_alpha"]),
                    "target_modules": LoraAdapter(config, {}, {}).target_modules,
                },
                s,
            )
        await self._check_target_modules(resolved.target_modules)
        raw = await self._read_data(tenant, chosen, source)
        rows = datasets.parse_jsonl(raw, chosen, s.max_examples)
        splits = datasets.split(
            rows, resolved.heldout_fraction, resolved.seed, s.min_train_examples,
            s.min_heldout_examples,
        )  # fmt: skip
        await self._check_base_model()
        job = Job(
            id=new_job_id(),
            tenant=tenant,
            adapter=adapter,
            method=str(chosen),
            state=QUEUED,
            params=resolved.to_dict(),
            init_adapter=init,
            data_source=source.kind,
            data_fingerprint=splits.fingerprint,
            train_examples=len(splits.train),
            heldout_examples=len(splits.heldout),
            created=time.time(),
        )
        await self.jobs.create(job, splits.to_json())
        log.info("training job queued", extra={"job": job.id, "tenant": tenant, "method": method})
        return job

    async def get_job(self, tenant: str, job_id: str) -> Job:
        return await self.jobs.get(tenant, job_id)

    async def list_jobs(self, tenant: str, page_size: int, page_token: str):
        return await self.jobs.list(tenant, page_size, page_token)

    async def cancel_job(self, tenant: str, job_id: str) -> Job:
        return await self.jobs.cancel(tenant, job_id)

    async def watch_job(self, tenant: str, job_id: str) -> AsyncIterator[Job]:
        """The job now, then each time it changes, until it has finished."""
        rev = -1
        while True:
            job = await self.jobs.get(tenant, job_id)
            if job.rev != rev:
                rev = job.rev
                yield job
            if job.finished:
                return
            await asyncio.sleep(self.settings.watch_poll_seconds)

    # -- candidates -------------------------------------------------------------------------

    async def list_candidates(self, tenant: str, page_size: int, page_token: str):
        return await self.candidates.list(tenant, page_size, page_token)

    def _require_experiments(self) -> xpb_grpc.ExperimentsServiceStub:
        if self.experiments is None:
            raise Unavailable(
                "experiments need the experiments service (EXPERIMENTS_ADDR)",
                reason="EXPERIMENTS_DISABLED",
            )
        return self.experiments

    async def _serving_version(self, tenant: str, name: str) -> int:
        try:
            reply = await call(
                self.inference.GetAdapter(
                    ipb.GetAdapterRequest(tenant=tenant, adapter=common_pb2.AdapterRef(name=name))
                ),
                "inference",
            )
        except NotFound:
            return 0
        return reply.adapter.version if reply.serving else 0

    async def start_experiment(
        self,
        tenant: str,
        name: str,
        version: int,
        traffic: float = 0.0,
        key: str = "",
        metric: str = "",
        auto_promote: bool = False,
    ) -> CandidateRecord:
        candidate = await self.candidates.get(tenant, name, version)
        traffic = traffic or 0.5
        if not 0 < traffic < 1:
            raise InvalidArgument(
                "candidate_traffic must be in (0, 1)", reason="PARAM_OUT_OF_RANGE"
            )
        if candidate.state != CANDIDATE:
            raise FailedPrecondition(
                f"{candidate.member} is {candidate.state.replace('_', ' ')}: an experiment "
                "needs a candidate without one",
                reason="NOT_A_CANDIDATE" if candidate.state not in OPEN else "EXPERIMENT_EXISTS",
            )
        stub = self._require_experiments()
        baseline = await self._serving_version(tenant, name)
        control = [xpb.VariantAdapter(name=name, version=baseline)] if baseline else []
        metric_pb = None
        if metric:
            kind = xpb.METRIC_KIND_MEAN if metric in _MEAN_METRICS else xpb.METRIC_KIND_RATE
            goal = xpb.METRIC_GOAL_DECREASE if metric == "latency_ms" else xpb.METRIC_GOAL_INCREASE
            metric_pb = xpb.Metric(name=metric, kind=kind, goal=goal)
        key = key or experiment_key_for(name, version)
        experiment = xpb.Experiment(
            key=key,
            description=f"training candidate {candidate.member} against version {baseline}",
            variants=[
                xpb.Variant(name="current", adapters=control, traffic_weight=1 - traffic),
                xpb.Variant(
                    name="candidate",
                    adapters=[xpb.VariantAdapter(name=name, version=version)],
                    traffic_weight=traffic,
                ),
            ],
            primary_metric=metric_pb,
        )
        await call(
            stub.CreateExperiment(
                xpb.CreateExperimentRequest(tenant=tenant, experiment=experiment)
            ),
            "experiments",
        )
        await call(
            stub.UpdateExperiment(
                xpb.UpdateExperimentRequest(
                    tenant=tenant, key=key, action=xpb.EXPERIMENT_ACTION_START
                )
            ),
            "experiments",
        )
        if auto_promote:
            await self.redis.sadd(AUTO_PROMOTE_TENANTS, tenant)
        return await self.candidates.transition(
            candidate,
            (CANDIDATE,),
            state=IN_EXPERIMENT,
            experiment_key=key,
            baseline_version=baseline,
            auto_promote=auto_promote,
        )

    async def _stop_experiment(self, candidate: CandidateRecord) -> None:
        if not candidate.experiment_key or self.experiments is None:
            return
        try:  # best effort: it may have been stopped already
            await self.experiments.UpdateExperiment(
                xpb.UpdateExperimentRequest(
                    tenant=candidate.tenant,
                    key=candidate.experiment_key,
                    action=xpb.EXPERIMENT_ACTION_STOP,
                )
            )
        except grpc.aio.AioRpcError as err:
            log.warning(
                "could not stop the candidate's experiment",
                extra={
                    "experiment": candidate.experiment_key,
                    "code": err.code().name,
                    "details": err.details(),
                },
            )

    async def promote(self, tenant: str, name: str, version: int) -> tuple[CandidateRecord, int]:
        """Hot-swap to the candidate; returns it and the version that served before."""
        candidate = await self.candidates.get(tenant, name, version)
        before = candidate.state
        promoted = await self.candidates.transition(candidate, OPEN, state=PROMOTED)
        try:
            reply = await call(
                self.inference.SwapAdapter(
                    ipb.SwapAdapterRequest(tenant=tenant, name=name, version=version)
                ),
                "inference",
            )
        except Exception:
            await self.candidates.transition(promoted, (PROMOTED,), state=before)
            raise
        await self._stop_experiment(promoted)
        previous = reply.previous.version if reply.previous.version != version else 0
        log.info(
            "candidate promoted", extra={"tenant": tenant, "adapter": name, "version": version}
        )
        return promoted, previous

    async def discard(self, tenant: str, name: str, version: int) -> CandidateRecord:
        candidate = await self.candidates.get(tenant, name, version)
        before = candidate.state
        discarded = await self.candidates.transition(candidate, OPEN, state=DISCARDED)
        # Stopped first: the experiments service checks that the variants' versions exist.
        await self._stop_experiment(discarded)
        try:
            await call(
                self.inference.DiscardCandidate(
                    ipb.DiscardCandidateRequest(tenant=tenant, name=name, version=version)
                ),
                "inference",
            )
        except NotFound:
            pass  # already gone from the registry: discarded all the same
        except Exception:
            await self.candidates.transition(discarded, (DISCARDED,), state=before)
            raise
        return discarded

    async def check_auto_promotions(self) -> int:
        """Promote each auto-promoting candidate whose experiment recommends shipping."""
        if self.experiments is None:
            return 0
        promoted = 0
        for raw in sorted(await self.redis.smembers(AUTO_PROMOTE_TENANTS)):
            tenant = raw.decode()
            token = ""
            while True:
                page, token = await self.candidates.list(tenant, 200, token)
                for c in page:
                    if c.state != IN_EXPERIMENT or not c.auto_promote:
                        continue
                    results = await self.experiments.GetResults(
                        xpb.GetResultsRequest(tenant=tenant, key=c.experiment_key)
                    )
                    if results.recommendation == xpb.RECOMMENDATION_SHIP:
                        await self.promote(tenant, c.name, c.version)
                        promoted += 1
                if not token:
                    break
        return promoted

    async def _auto_promote_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.auto_promote_interval_seconds)
            try:
                await self.check_auto_promotions()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("auto-promotion check failed")

    def start(self) -> None:
        if self.experiments is not None and self._auto_task is None:
            self._auto_task = asyncio.create_task(self._auto_promote_loop(), name="auto-promote")

    def cancel(self) -> None:
        if self._auto_task is not None:
            self._auto_task.cancel()

    async def close(self) -> None:
        if self._auto_task is not None:
            self._auto_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._auto_task

    # -- federation -------------------------------------------------------------------------

    async def federate(
        self,
        tenant: str,
        participants: list[Participant],
        method: str,
        rank: int,
        output_name: str,
    ) -> tuple[FederatedAdapter, ipb.RegisterAdapterResponse]:
        """Tenant-scoped (tenant given: its own adapters, result registered as its candidate)
        or platform-wide (tenant empty: anyone's adapters, result a shared adapter)."""
        if tenant:
            check_tenant(tenant)
        check_adapter_name(output_name)
        federation = LoRAFederation(FederationConfig(method=method, rank=rank or None))
        if len(participants) < 2:
            raise InvalidArgument(
                "a federation needs two or more adapters", reason="TOO_FEW_ADAPTERS"
            )
        adapters = []
        for p in participants:
            owner = p.tenant or tenant
            if tenant and owner != tenant:
                # the same answer as for a missing adapter: another tenant's does not leak
                raise NotFound(f"adapter {p.name!r} not found", reason="ADAPTER_NOT_FOUND")
            if not owner:
                raise InvalidArgument("name each participant's tenant", reason="MISSING_TENANT")
            reply = await call(
                self.inference.GetAdapter(
                    ipb.GetAdapterRequest(
                        tenant=check_tenant(owner),
                        adapter=common_pb2.AdapterRef(name=p.name, version=p.version),
                        include_files=True,
                    )
                ),
                "inference",
            )
            files = {f.name: f.content for f in reply.files}
            adapters.append(
                LoraAdapter.from_files(
                    files["adapter_config.json"], files["adapter_model.safetensors"]
                )
            )
        merged = await asyncio.to_thread(
            federation.aggregate, adapters, [p.num_samples for p in participants]
        )
        files = merged.files()
        registered = await call(
            self.inference.RegisterAdapter(
                ipb.RegisterAdapterRequest(
                    tenant=tenant,
                    name=output_name,
                    files=[ipb.AdapterFile(name=k, content=v) for k, v in files.items()],
                    shared=not tenant,
                    candidate=bool(tenant),
                )
            ),
            "inference",
        )
        if tenant:
            record = {
                "method": "federation",
                "federation": {
                    "method": method,
                    "participants": [
                        {"tenant": p.tenant or tenant, "adapter": p.name, "version": p.version}
                        for p in participants
                    ],
                    "weights": merged.weights,
                    "relative_error": merged.relative_error,
                },
                "params": {"rank": merged.rank},
            }
            candidate = CandidateRecord(tenant, output_name, registered.adapter.version, "", record)
            key, index = self.candidates.keys(tenant, output_name, registered.adapter.version)
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.set(key, json.dumps(candidate.to_json()), ex=self.settings.retention_seconds)
                pipe.zadd(index, {candidate.member: candidate.created})
                await pipe.execute()
        log.info(
            "adapters federated",
            extra={"owner": tenant or PLATFORM, "adapter": output_name, "method": method},
        )
        return merged, registered
