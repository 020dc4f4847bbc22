"""The training service over gRPC with real Redis, the real model, real PEFT adapters and TRL:
jobs (streamed progress, candidate registration, cancel), candidates (experiment, promote,
discard), federation, and every kind of bad input refused with a reason."""

from __future__ import annotations

import json

import grpc
import numpy as np
import pytest
from safetensors.numpy import load, save

from loraplex.common.v1 import common_pb2
from loraplex.experiments.v1 import experiments_service_pb2 as xpb
from loraplex.experiments.v1 import experiments_service_pb2_grpc as xpb_grpc
from loraplex.inference.v1 import inference_service_pb2 as ipb
from loraplex.training.v1 import training_service_pb2 as pb
from tests.helpers import DEMO_ADAPTERS, adapter_files, error_reason, new_tenant, register
from tests.training_data import reference_pairs, to_jsonl

pytestmark = pytest.mark.integration

SFT_ROWS = reference_pairs("retailer", 24)


def _ref(name: str, version: int = 0) -> common_pb2.AdapterRef:
    return common_pb2.AdapterRef(name=name, version=version)


def sft_request(tenant: str, rows=SFT_ROWS, **params) -> pb.CreateJobRequest:
    return pb.CreateJobRequest(
        tenant=tenant,
        adapter="support",
        method=pb.TRAINING_METHOD_SFT,
        data=pb.DataSource(upload=pb.UploadedDataset(jsonl=to_jsonl(rows))),
        params=pb.TrainingParams(**{"max_steps": 4, "batch_size": 4, **params}),
    )


async def expect_error(call, code: grpc.StatusCode, reason: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call
    assert (err.value.code(), error_reason(err.value)) == (code, reason), err.value.details()


async def watch(training_stub, tenant: str, job_id: str) -> list[pb.Job]:
    stream = training_stub.WatchJob(pb.WatchJobRequest(tenant=tenant, job_id=job_id), timeout=170)
    return [reply.job async for reply in stream]


async def test_sft_job_streams_progress_then_registers_a_candidate_that_promotes_once(
    training_stub, stub, worker
):
    tenant = new_tenant()
    # support v1, trained on another domain (the bank's): retailer replies improve it
    await register(stub, tenant, "bank")
    request = sft_request(tenant, learning_rate=1e-3)
    request.init_adapter.CopyFrom(_ref("support"))
    job = (await training_stub.CreateJob(request)).job
    assert job.state == pb.JOB_STATE_QUEUED
    assert job.init_adapter.version == 1  # "current" pinned at creation
    # continuing keeps the adapter's own shape
    assert (job.params.rank, list(job.params.target_modules)) == (
        16,
        ["k_proj", "o_proj", "q_proj", "v_proj"],
    )
    assert job.train_examples + job.heldout_examples == len(SFT_ROWS)

    seen = await watch(training_stub, tenant, job.id)
    final = seen[-1]
    assert final.state == pb.JOB_STATE_SUCCEEDED, final.error_message
    assert pb.JOB_STATE_RUNNING in [j.state for j in seen]
    steps = [j.progress.step for j in seen if j.progress.step]
    assert steps == sorted(steps) and steps[-1] == 4
    running = next(j for j in seen if j.progress.step)
    assert running.progress.total_steps == 4 and running.progress.tokens_per_second > 0
    assert running.progress.HasField("eval_loss")

    record = final.record
    assert final.candidate.version == 2
    assert record.eval_loss < record.eval_loss_before  # trained on this tenant's replies
    assert record.data_fingerprint == job.data_fingerprint
    assert (record.steps, record.init_adapter.version) == (4, 1)
    assert record.train_tokens > 0 and record.tokens_per_second > 0

    got = await stub.GetAdapter(ipb.GetAdapterRequest(tenant=tenant, adapter=_ref("support", 2)))
    assert (got.candidate, got.serving) == (True, False)
    listed = await training_stub.ListCandidates(pb.ListCandidatesRequest(tenant=tenant))
    assert [(c.adapter.version, c.state) for c in listed.candidates] == [
        (2, pb.CANDIDATE_STATE_CANDIDATE)
    ]

    promote = pb.PromoteCandidateRequest(tenant=tenant, candidate=_ref("support", 2))
    promoted = await training_stub.PromoteCandidate(promote)
    assert (promoted.previous_version, promoted.candidate.state) == (1, pb.CANDIDATE_STATE_PROMOTED)
    got = await stub.GetAdapter(ipb.GetAdapterRequest(tenant=tenant, adapter=_ref("support")))
    assert (got.adapter.version, got.serving) == (2, True)
    await expect_error(
        training_stub.PromoteCandidate(promote),
        grpc.StatusCode.FAILED_PRECONDITION,
        "NOT_A_CANDIDATE",
    )
    await expect_error(
        training_stub.CancelJob(pb.CancelJobRequest(tenant=tenant, job_id=job.id)),
        grpc.StatusCode.FAILED_PRECONDITION,
        "JOB_FINISHED",
    )


async def test_dpo_job_trains_on_preference_pairs(training_stub, stub, worker):
    tenant = new_tenant()
    pairs = [
        {"prompt": r["prompt"], "chosen": r["completion"], "rejected": " I cannot help with that."}
        for r in SFT_ROWS[:12]
    ]
    job = (
        await training_stub.CreateJob(
            pb.CreateJobRequest(
                tenant=tenant,
                adapter="prefs",
                method=pb.TRAINING_METHOD_DPO,
                data=pb.DataSource(upload=pb.UploadedDataset(jsonl=to_jsonl(pairs))),
                params=pb.TrainingParams(max_steps=2, batch_size=4, learning_rate=5e-3),
            )
        )
    ).job
    final = (await watch(training_stub, tenant, job.id))[-1]
    assert final.state == pb.JOB_STATE_SUCCEEDED, final.error_message
    assert final.candidate.version == 1
    # a fresh name's first version is a candidate too: nothing serves under it yet
    got = await stub.GetAdapter(ipb.GetAdapterRequest(tenant=tenant, adapter=_ref("prefs", 1)))
    assert (got.candidate, got.serving) == (True, False)


async def test_jobs_are_tenant_scoped_and_a_queued_job_cancels_at_once(training_stub):
    owner, other = new_tenant(), new_tenant()
    job = (await training_stub.CreateJob(sft_request(owner))).job
    try:
        await expect_error(
            training_stub.GetJob(pb.GetJobRequest(tenant=other, job_id=job.id)),
            grpc.StatusCode.NOT_FOUND,
            "JOB_NOT_FOUND",
        )
        assert not (await training_stub.ListJobs(pb.ListJobsRequest(tenant=other))).jobs
        await expect_error(
            training_stub.CancelJob(pb.CancelJobRequest(tenant=other, job_id=job.id)),
            grpc.StatusCode.NOT_FOUND,
            "JOB_NOT_FOUND",
        )
        second = (await training_stub.CreateJob(sft_request(owner))).job
        page = await training_stub.ListJobs(pb.ListJobsRequest(tenant=owner, page_size=1))
        assert [j.id for j in page.jobs] == [second.id] and page.next_page_token
        rest = await training_stub.ListJobs(
            pb.ListJobsRequest(tenant=owner, page_token=page.next_page_token)
        )
        assert [j.id for j in rest.jobs] == [job.id] and not rest.next_page_token
    finally:
        for j in (await training_stub.ListJobs(pb.ListJobsRequest(tenant=owner))).jobs:
            cancelled = await training_stub.CancelJob(
                pb.CancelJobRequest(tenant=owner, job_id=j.id)
            )
            assert cancelled.job.state == pb.JOB_STATE_CANCELLED


def _with_config(files: dict[str, bytes], **changes) -> dict[str, bytes]:
    config = json.loads(files["adapter_config.json"])
    config.update(changes)
    return {**files, "adapter_config.json": json.dumps(config).encode()}


async def _register_files(stub, tenant: str, name: str, files: dict[str, bytes], **kw):
    request = ipb.RegisterAdapterRequest(
        tenant=tenant,
        name=name,
        files=[ipb.AdapterFile(name=k, content=v) for k, v in files.items()],
        **kw,
    )
    return (await stub.RegisterAdapter(request)).adapter


async def test_bad_job_requests_are_refused_with_reasons_and_nothing_is_queued(training_stub, stub):
    tenant, other = new_tenant(), new_tenant()
    await register(stub, other, "retailer")  # another tenant's adapter
    foreign = _with_config(
        adapter_files(DEMO_ADAPTERS / "retailer"), base_model_name_or_path="llama-7b"
    )
    await _register_files(stub, tenant, "foreign", foreign)
    bad = grpc.StatusCode.INVALID_ARGUMENT
    no_source = sft_request(tenant)
    no_source.ClearField("data")
    empty = sft_request(tenant, rows=[])
    few = sft_request(tenant, rows=SFT_ROWS[:2])
    dpo = sft_request(tenant)
    dpo.method = pb.TRAINING_METHOD_DPO
    no_method = sft_request(tenant)
    no_method.method = pb.TRAINING_METHOD_UNSPECIFIED
    other_init = sft_request(tenant)
    other_init.init_adapter.CopyFrom(_ref("support"))
    foreign_init = sft_request(tenant)
    foreign_init.init_adapter.CopyFrom(_ref("foreign"))
    bad_name = sft_request(tenant)
    bad_name.adapter = "../escape"
    cases = [
        (no_source, bad, "NO_DATA_SOURCE"),
        (empty, bad, "EMPTY_DATASET"),
        (few, bad, "TOO_FEW_EXAMPLES"),
        (dpo, bad, "DPO_WITHOUT_PAIRS"),
        (no_method, bad, "UNKNOWN_METHOD"),
        (sft_request(tenant, rank=0), bad, "PARAM_OUT_OF_RANGE"),
        (sft_request(tenant, learning_rate=5.0), bad, "PARAM_OUT_OF_RANGE"),
        (sft_request(tenant, heldout_fraction=0.9), bad, "PARAM_OUT_OF_RANGE"),
        (sft_request(tenant, target_modules=["attn_proj"]), bad, "UNKNOWN_TARGET_MODULE"),
        (other_init, grpc.StatusCode.NOT_FOUND, "ADAPTER_NOT_FOUND"),
        (foreign_init, bad, "BASE_MODEL_MISMATCH"),
        (bad_name, bad, "INVALID_ADAPTER_NAME"),
    ]
    for request, code, reason in cases:
        await expect_error(training_stub.CreateJob(request), code, reason)
    assert not (await training_stub.ListJobs(pb.ListJobsRequest(tenant=tenant))).jobs
    # feedback as a source needs the active-learning service, which this server lacks
    feedback = sft_request(tenant)
    feedback.data.CopyFrom(pb.DataSource(feedback=pb.FeedbackSource()))
    await expect_error(
        training_stub.CreateJob(feedback), grpc.StatusCode.UNAVAILABLE, "ACTIVELEARNING_DISABLED"
    )


def _scaled(files: dict[str, bytes], factor: float) -> dict[str, bytes]:
    """The same adapter with every B scaled: another adapter with the same shape."""
    tensors = load(files["adapter_model.safetensors"])
    out = {k: (v * factor if ".lora_B." in k else v) for k, v in tensors.items()}
    return {**files, "adapter_model.safetensors": save(out)}


def _delta(files: dict[str, bytes]) -> dict[str, np.ndarray]:
    config = json.loads(files["adapter_config.json"])
    scale = config["lora_alpha"] / config["r"]
    tensors = {k: v.astype(np.float64) for k, v in load(files["adapter_model.safetensors"]).items()}
    return {
        k.removesuffix(".lora_A.weight"): scale
        * tensors[k.replace("lora_A", "lora_B")]
        @ tensors[k]
        for k in tensors
        if ".lora_A." in k
    }


async def test_federation_over_grpc_matches_the_weighted_mean_and_makes_a_candidate(
    training_stub, stub, experiments_stub_for_training
):
    tenant = new_tenant()
    retailer = adapter_files(DEMO_ADAPTERS / "retailer")
    other = _scaled(retailer, -0.5)
    retailer = _scaled(retailer, 1.0)
    await _register_files(stub, tenant, "site-a", retailer)
    await _register_files(stub, tenant, "site-b", other)
    await register(stub, tenant, "retailer", name="shared-support")  # v1 serves
    reply = await training_stub.Federate(
        pb.FederateRequest(
            tenant=tenant,
            participants=[
                pb.FederationParticipant(adapter=_ref("site-a"), num_samples=300),
                pb.FederationParticipant(adapter=_ref("site-b"), num_samples=100),
            ],
            method=pb.FEDERATION_METHOD_STACK,
            output_name="shared-support",
        )
    )
    assert reply.relative_error <= 1e-6 and reply.rank == 16
    assert list(reply.weights) == pytest.approx([0.75, 0.25])
    got = await stub.GetAdapter(
        ipb.GetAdapterRequest(
            tenant=tenant, adapter=_ref("shared-support", reply.adapter.version), include_files=True
        )
    )
    assert got.candidate
    merged = _delta({f.name: f.content for f in got.files})
    a, b = _delta(retailer), _delta(other)
    num = sum(float(np.sum((merged[k] - (0.75 * a[k] + 0.25 * b[k])) ** 2)) for k in a)
    den = sum(float(np.sum((0.75 * a[k] + 0.25 * b[k]) ** 2)) for k in a)
    assert (num / den) ** 0.5 <= 1e-6

    # candidate -> experiment (current v1 against it) -> discard
    candidate = _ref("shared-support", reply.adapter.version)
    started = await training_stub.StartCandidateExperiment(
        pb.StartCandidateExperimentRequest(
            tenant=tenant, candidate=candidate, candidate_traffic=0.2
        )
    )
    key = started.candidate.experiment_key
    assert (started.candidate.state, started.candidate.baseline_version) == (
        pb.CANDIDATE_STATE_IN_EXPERIMENT,
        1,
    )
    experiment = (
        await experiments_stub_for_training.GetExperiment(
            xpb.GetExperimentRequest(tenant=tenant, key=key)
        )
    ).experiment
    assert experiment.status == xpb.EXPERIMENT_STATUS_RUNNING
    assert [(v.adapters[0].version, v.traffic_weight) for v in experiment.variants] == [
        (1, pytest.approx(0.8)),
        (reply.adapter.version, pytest.approx(0.2)),
    ]
    await expect_error(
        training_stub.StartCandidateExperiment(
            pb.StartCandidateExperimentRequest(tenant=tenant, candidate=candidate)
        ),
        grpc.StatusCode.FAILED_PRECONDITION,
        "EXPERIMENT_EXISTS",
    )
    discarded = await training_stub.DiscardCandidate(
        pb.DiscardCandidateRequest(tenant=tenant, candidate=candidate)
    )
    assert discarded.candidate.state == pb.CANDIDATE_STATE_DISCARDED
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.GetAdapter(ipb.GetAdapterRequest(tenant=tenant, adapter=candidate))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    experiment = (
        await experiments_stub_for_training.GetExperiment(
            xpb.GetExperimentRequest(tenant=tenant, key=key)
        )
    ).experiment
    assert experiment.status == xpb.EXPERIMENT_STATUS_STOPPED
    await expect_error(
        training_stub.PromoteCandidate(
            pb.PromoteCandidateRequest(tenant=tenant, candidate=candidate)
        ),
        grpc.StatusCode.FAILED_PRECONDITION,
        "NOT_A_CANDIDATE",
    )


async def test_bad_federations_are_refused(training_stub, stub):
    tenant, other = new_tenant(), new_tenant()
    await register(stub, tenant, "retailer", name="a")
    await register(stub, tenant, "bank", name="b")  # other target modules
    await register(stub, other, "retailer", name="c")

    def federate(*names, tenants=("", ""), method=pb.FEDERATION_METHOD_STACK):
        return training_stub.Federate(
            pb.FederateRequest(
                tenant=tenant,
                participants=[
                    pb.FederationParticipant(tenant=t, adapter=_ref(n), num_samples=1)
                    for n, t in zip(names, tenants, strict=True)
                ],
                method=method,
                output_name="merged",
            )
        )

    bad = grpc.StatusCode.INVALID_ARGUMENT
    await expect_error(federate("a", "b"), bad, "TARGET_MODULES_MISMATCH")
    await expect_error(
        federate("a", "c", tenants=("", other)), grpc.StatusCode.NOT_FOUND, "ADAPTER_NOT_FOUND"
    )
    await expect_error(federate("a", "c"), grpc.StatusCode.NOT_FOUND, "ADAPTER_NOT_FOUND")
    await expect_error(federate("a", "a", method=7), bad, "UNKNOWN_FEDERATION_METHOD")
    with pytest.raises(grpc.aio.AioRpcError):
        await stub.GetAdapter(ipb.GetAdapterRequest(tenant=tenant, adapter=_ref("merged")))


@pytest.fixture(scope="session")
async def experiments_stub_for_training(training_servers):
    async with grpc.aio.insecure_channel(f"127.0.0.1:{training_servers.experiments.port}") as ch:
        yield xpb_grpc.ExperimentsServiceStub(ch)


async def test_auto_promotion_when_the_experiment_says_ship(training_stub, training_servers, stub):
    tenant = new_tenant()
    await register(stub, tenant, "retailer", name="a")
    await register(stub, tenant, "retailer", name="merged")  # v1 serves
    reply = await training_stub.Federate(
        pb.FederateRequest(
            tenant=tenant,
            participants=[
                pb.FederationParticipant(adapter=_ref("a"), num_samples=1),
                pb.FederationParticipant(adapter=_ref("merged"), num_samples=1),
            ],
            method=pb.FEDERATION_METHOD_FEDAVG,
            output_name="merged",
        )
    )
    candidate = _ref("merged", reply.adapter.version)
    await training_stub.StartCandidateExperiment(
        pb.StartCandidateExperimentRequest(tenant=tenant, candidate=candidate, auto_promote=True)
    )
    core = training_servers.app.core
    real = core.experiments

    class Verdict:
        """The real experiments service, except that its results recommend `verdict`."""

        def __init__(self, verdict):
            self.verdict = verdict

        def __getattr__(self, name):
            return getattr(real, name)

        async def GetResults(self, request):
            return xpb.GetResultsResponse(recommendation=self.verdict)

    try:
        core.experiments = Verdict(xpb.RECOMMENDATION_KEEP_RUNNING)
        await core.check_auto_promotions()
        got = await stub.GetAdapter(ipb.GetAdapterRequest(tenant=tenant, adapter=_ref("merged")))
        assert got.adapter.version == 1
        core.experiments = Verdict(xpb.RECOMMENDATION_SHIP)
        assert await core.check_auto_promotions() >= 1
    finally:
        core.experiments = real
    got = await stub.GetAdapter(ipb.GetAdapterRequest(tenant=tenant, adapter=_ref("merged")))
    assert got.adapter.version == reply.adapter.version and got.serving
    listed = await training_stub.ListCandidates(pb.ListCandidatesRequest(tenant=tenant))
    assert listed.candidates[0].state == pb.CANDIDATE_STATE_PROMOTED
