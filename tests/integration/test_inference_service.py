"""The inference service over real gRPC with the real model, real adapters and real Redis."""

from __future__ import annotations

import asyncio
import itertools
import json
import uuid

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from loraplex.common.v1 import common_pb2
from loraplex.inference.v1 import inference_service_pb2 as pb
from loraplex.inference.v1 import inference_service_pb2_grpc as pb_grpc
from services.common.redis import connect
from services.inference.app import create_server
from services.inference.settings import InferenceSettings
from tests.helpers import DEMO_ADAPTERS, adapter_files, error_reason, new_tenant, register

pytestmark = pytest.mark.integration

PROMPT = "Customer: Where is my order 4821?\nAgent:"


def generate_request(tenant: str, adapter: str = "", **params) -> pb.GenerateRequest:
    params.setdefault("max_new_tokens", 16)
    params.setdefault("temperature", 0.0)
    return pb.GenerateRequest(
        tenant=tenant,
        adapter=common_pb2.AdapterRef(name=adapter),
        prompt=params.pop("prompt", PROMPT),
        params=pb.SamplingParams(**params),
    )


async def expect_error(call, code: grpc.StatusCode) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    assert info.value.code() == code, info.value.details()
    return info.value


async def test_health_is_serving_once_ready(channel):
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "loraplex.inference.v1.InferenceService"):
        reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_generate_with_tenant_adapter_returns_text_usage_and_uncertainty(stub):
    tenant = new_tenant()
    info = await register(stub, tenant)
    assert info.version == 1 and info.rank > 0 and info.size_bytes > 0 and len(info.sha256) == 64

    reply = await stub.Generate(generate_request(tenant, "support"))

    assert reply.text.strip()
    assert reply.adapter.name == "support" and reply.adapter.version == 1
    assert reply.usage.completion_tokens == len(reply.token_logprobs) > 0
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    assert reply.uncertainty.mean_token_entropy > 0
    assert reply.uncertainty.mean_logprob < 0
    assert 0 < reply.uncertainty.min_token_prob <= 1
    assert reply.timing.total_seconds >= reply.timing.time_to_first_token_seconds > 0


async def test_adapter_changes_the_output_of_the_base_model(stub):
    tenant = new_tenant()
    await register(stub, tenant, demo="bank")
    base = await stub.Generate(generate_request(tenant, max_new_tokens=24))
    tuned = await stub.Generate(generate_request(tenant, "support", max_new_tokens=24))
    assert base.token_logprobs != tuned.token_logprobs


async def test_greedy_is_deterministic_and_seeded_sampling_reproducible(stub):
    tenant = new_tenant()
    await register(stub, tenant)
    greedy = [await stub.Generate(generate_request(tenant, "support")) for _ in range(2)]
    assert greedy[0].text == greedy[1].text
    sampled = [
        await stub.Generate(generate_request(tenant, "support", temperature=1.0, seed=seed))
        for seed in (7, 7, 8)
    ]
    assert sampled[0].text == sampled[1].text
    assert sampled[0].token_logprobs != sampled[2].token_logprobs


async def test_unset_sampling_uses_the_models_recommendation(stub, inference):
    _, core = inference
    assert (core.engine.default_temperature, core.engine.default_top_p) == (0.7, 0.9)
    tenant = new_tenant()
    await register(stub, tenant)

    async def sample(**params):
        request = generate_request(tenant, "support", max_new_tokens=24, seed=11, **params)
        if "temperature" not in params:
            request.params.ClearField("temperature")
        return (await stub.Generate(request)).token_logprobs

    unset = await sample()
    assert unset == await sample(temperature=0.7, top_p=0.9)
    assert unset != await sample(temperature=1.0, top_p=1.0)


async def test_stop_sequence_cuts_the_text(stub):
    tenant = new_tenant()
    await register(stub, tenant)
    full = await stub.Generate(generate_request(tenant, "support", max_new_tokens=32))
    words = full.text.split()
    assert len(words) >= 3, full.text
    stop = words[2]
    cut = await stub.Generate(generate_request(tenant, "support", max_new_tokens=32, stop=[stop]))
    assert cut.finish_reason == pb.FINISH_REASON_STOP
    assert stop not in cut.text
    assert full.text.startswith(cut.text)


async def test_token_texts_are_each_tokens_share_of_the_text(stub, inference):
    """The text each token added (what the review screen shades by entropy): the difference
    of the tokenizer's decodes of consecutive prefixes, joined the text, cut at a stop."""
    tenant = new_tenant()
    await register(stub, tenant)
    full = await stub.Generate(
        generate_request(tenant, "support", max_new_tokens=24, top_logprobs=0)
    )
    ids = [d.token_id for d in full.choices[0].logprobs]
    decode = inference[1].engine.tokenizer.decode
    prefixes = [decode(ids[:k], skip_special_tokens=True) for k in range(len(ids) + 1)]
    expected = [b[len(a) :] for a, b in itertools.pairwise(prefixes)]
    assert all(b.startswith(a) for a, b in itertools.pairwise(prefixes))
    assert list(full.token_texts) == expected
    assert "".join(full.token_texts) == full.text
    assert len(full.token_texts) == len(full.token_entropies) == full.usage.completion_tokens

    stop = full.text.split()[2]
    cut = await stub.Generate(generate_request(tenant, "support", max_new_tokens=24, stop=[stop]))
    assert len(cut.token_texts) == cut.usage.completion_tokens
    assert "".join(cut.token_texts) == cut.text


async def test_length_finish_reason(stub):
    reply = await stub.Generate(generate_request(new_tenant(), max_new_tokens=2, prompt="The"))
    assert reply.usage.completion_tokens <= 2
    if reply.usage.completion_tokens == 2:
        assert reply.finish_reason == pb.FINISH_REASON_LENGTH


async def test_chat_messages_use_the_chat_template(stub):
    tenant = new_tenant()
    await register(stub, tenant)
    request = pb.GenerateRequest(
        tenant=tenant,
        adapter=common_pb2.AdapterRef(name="support"),
        messages=[pb.ChatMessage(role="user", content="Where is my order 4821?")],
        params=pb.SamplingParams(max_new_tokens=16, temperature=0),
    )
    reply = await stub.Generate(request)
    assert reply.text.strip()
    # The rendered prompt carries the template's role prefixes: more tokens than the content.
    assert reply.usage.prompt_tokens > 5


async def test_foreign_and_unknown_adapters_get_the_same_not_found(stub):
    owner, other = new_tenant(), new_tenant()
    await register(stub, owner, name="private")
    foreign = await expect_error(
        stub.Generate(generate_request(other, "private")), grpc.StatusCode.NOT_FOUND
    )
    unknown = await expect_error(
        stub.Generate(generate_request(other, "nothing")), grpc.StatusCode.NOT_FOUND
    )
    assert foreign.details().replace("private", "X") == unknown.details().replace("nothing", "X")
    assert error_reason(foreign) == error_reason(unknown) == "ADAPTER_NOT_FOUND"
    listed = await stub.ListAdapters(pb.ListAdaptersRequest(tenant=other))
    assert "private" not in [a.name for a in listed.adapters]


async def test_shared_adapter_is_visible_to_every_tenant(stub):
    name = f"shared-{uuid.uuid4().hex[:6]}"
    files = adapter_files(DEMO_ADAPTERS / "airline")
    info = (
        await stub.RegisterAdapter(
            pb.RegisterAdapterRequest(
                name=name,
                shared=True,
                files=[pb.AdapterFile(name=k, content=v) for k, v in files.items()],
            )
        )
    ).adapter
    assert info.shared and info.tenant == ""
    for tenant in (new_tenant(), new_tenant()):
        listed = await stub.ListAdapters(pb.ListAdaptersRequest(tenant=tenant))
        assert name in [a.name for a in listed.adapters if a.shared]
        reply = await stub.Generate(generate_request(tenant, name))
        assert reply.adapter.name == name


async def test_versions_and_pinning(stub):
    tenant = new_tenant()
    first = await register(stub, tenant, demo="retailer")
    second = await register(stub, tenant, demo="bank")
    assert (first.version, second.version) == (1, 2)
    current = await stub.Generate(generate_request(tenant, "support"))
    assert current.adapter.version == 2
    pinned = pb.GenerateRequest(
        tenant=tenant,
        adapter=common_pb2.AdapterRef(name="support", version=1),
        prompt=PROMPT,
        params=pb.SamplingParams(max_new_tokens=4, temperature=0),
    )
    assert (await stub.Generate(pinned)).adapter.version == 1
    await expect_error(
        register(stub, tenant, demo="airline", version=2), grpc.StatusCode.ALREADY_EXISTS
    )


async def test_list_adapters_pages(stub):
    tenant = new_tenant()
    for i in range(3):
        await register(stub, tenant, name=f"a{i}")
    names, token = [], ""
    while True:
        page = await stub.ListAdapters(
            pb.ListAdaptersRequest(tenant=tenant, page_size=2, page_token=token)
        )
        names += [a.name for a in page.adapters if not a.shared]
        token = page.next_page_token
        if not token:
            break
    assert names == ["a0", "a1", "a2"]


# -- bad adapters ---------------------------------------------------------------------------


async def register_files(stub, tenant: str, files: dict[str, bytes], **kw):
    return await stub.RegisterAdapter(
        pb.RegisterAdapterRequest(
            tenant=tenant,
            name=kw.pop("name", "bad"),
            files=[pb.AdapterFile(name=k, content=v) for k, v in files.items()],
            **kw,
        )
    )


async def test_pickle_adapter_is_refused(stub):
    files = adapter_files(DEMO_ADAPTERS / "retailer")
    files["adapter_model.bin"] = files.pop("adapter_model.safetensors")
    err = await expect_error(
        register_files(stub, new_tenant(), files), grpc.StatusCode.INVALID_ARGUMENT
    )
    assert error_reason(err) == "PICKLE_REFUSED"
    assert "safetensors" in err.details()


async def test_sha256_mismatch_is_refused(stub):
    files = adapter_files(DEMO_ADAPTERS / "retailer")
    err = await expect_error(
        register_files(stub, new_tenant(), files, expected_sha256="0" * 64),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert error_reason(err) == "SHA256_MISMATCH"


async def test_target_modules_missing_from_base_model_are_refused(stub):
    files = adapter_files(DEMO_ADAPTERS / "retailer")
    config = json.loads(files["adapter_config.json"])
    config["target_modules"] = ["c_attn", "q_proj"]
    files["adapter_config.json"] = json.dumps(config).encode()
    err = await expect_error(
        register_files(stub, new_tenant(), files), grpc.StatusCode.INVALID_ARGUMENT
    )
    assert error_reason(err) == "TARGET_MODULES_NOT_FOUND"
    assert "c_attn" in err.details()


async def test_adapter_of_another_architecture_is_refused(stub, foreign_adapter_files):
    err = await expect_error(
        register_files(stub, new_tenant(), foreign_adapter_files),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert error_reason(err) == "BASE_MODEL_MISMATCH"


async def test_adapter_name_cannot_escape_the_store(stub, inference):
    _, core = inference
    files = adapter_files(DEMO_ADAPTERS / "retailer")
    for name in ("../../escape", "a/b", ".hidden"):
        await expect_error(
            register_files(stub, new_tenant(), files, name=name), grpc.StatusCode.INVALID_ARGUMENT
        )
    root = core.store.root
    assert not any("escape" in str(p) for p in root.parent.rglob("*"))


async def test_tampered_store_file_fails_the_integrity_check_at_load(stub, inference):
    _, core = inference
    tenant = new_tenant()
    info = await register(stub, tenant, name="tampered")
    weights = core.store.root / tenant / "tampered" / info.sha256 / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\0")
    err = await expect_error(
        stub.Generate(generate_request(tenant, "tampered")), grpc.StatusCode.DATA_LOSS
    )
    assert error_reason(err) == "SHA256_MISMATCH"


# -- bad generation parameters ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("params", "reason"),
    [
        ({"max_new_tokens": -1}, "BAD_MAX_TOKENS"),
        ({"max_new_tokens": 100_000}, "BAD_MAX_TOKENS"),
        ({"temperature": -0.5}, "BAD_TEMPERATURE"),
        ({"top_p": 0.0}, "BAD_TOP_P"),
        ({"prompt": ""}, "EMPTY_PROMPT"),
        ({"prompt": "word " * 5000}, "CONTEXT_LENGTH_EXCEEDED"),
    ],
)
async def test_bad_generation_parameters(stub, params, reason):
    err = await expect_error(
        stub.Generate(generate_request(new_tenant(), **params)), grpc.StatusCode.INVALID_ARGUMENT
    )
    assert error_reason(err) == reason


async def test_max_new_tokens_zero_means_as_many_as_fit(stub, inference):
    _, core = inference
    context = core.engine.context_length
    prompt = "Customer: hello\nAgent: hi\n" * 200
    ids = core.engine.encode(prompt)[: context - 3]
    prompt = core.engine.tokenizer.decode(ids, skip_special_tokens=True)
    assert context - 6 < len(core.engine.encode(prompt)) <= context - 1
    reply = await stub.Generate(generate_request(new_tenant(), prompt=prompt, max_new_tokens=0))
    assert reply.usage.prompt_tokens + reply.usage.completion_tokens <= context


async def test_invalid_tenant_id_is_invalid_argument(stub):
    await expect_error(stub.Generate(generate_request("../x")), grpc.StatusCode.INVALID_ARGUMENT)


# -- cache and score ----------------------------------------------------------------------------


async def test_load_unload_and_cache_stats(stub):
    tenant = new_tenant()
    await register(stub, tenant, name="cached")
    ref = common_pb2.AdapterRef(name="cached")
    first = await stub.LoadAdapter(pb.LoadAdapterRequest(tenant=tenant, adapter=ref))
    again = await stub.LoadAdapter(pb.LoadAdapterRequest(tenant=tenant, adapter=ref))
    assert (first.was_cached, again.was_cached) == (False, True)
    stats = await stub.CacheStats(pb.CacheStatsRequest())
    entry = next(a for a in stats.adapters if a.tenant == tenant and a.name == "cached")
    assert entry.size_bytes == first.adapter.size_bytes
    assert stats.used_bytes >= entry.size_bytes and stats.misses >= 1 and stats.hits >= 1
    unloaded = await stub.UnloadAdapter(pb.UnloadAdapterRequest(tenant=tenant, adapter=ref))
    assert unloaded.was_loaded
    stats = await stub.CacheStats(pb.CacheStatsRequest())
    assert not any(a.tenant == tenant for a in stats.adapters)


def heldout_exchanges(tenant: str, count: int) -> list[tuple[str, str]]:
    """(prompt, answer) pairs from the tenant's held-out text, which no adapter trained on."""
    lines = (DEMO_ADAPTERS.parent / "data" / tenant / "heldout.txt").read_text().splitlines()
    pairs = [
        (f"{q}\nAgent:", a.removeprefix("Agent:"))
        for q, a in itertools.pairwise(lines)
        if q.startswith("Customer: ") and a.startswith("Agent: ")
    ]
    return pairs[:count]


async def test_score_prefers_the_tenants_text_under_its_adapter(stub):
    tenant = new_tenant()
    await register(stub, tenant, demo="bank", name="bank")
    gains = []
    for prompt, answer in heldout_exchanges("bank", 12):
        request = pb.ScoreRequest(tenant=tenant, prompt=prompt, completions=[answer, " zq xv qq"])
        base = await stub.Score(request)
        request.adapter.name = "bank"
        tuned = await stub.Score(request)
        for reply in (base, tuned):
            real, noise = reply.scores
            assert real.num_tokens == len(real.token_logprobs) > 0
            assert real.total_logprob == pytest.approx(sum(real.token_logprobs), rel=1e-5)
            assert real.mean_logprob > noise.mean_logprob
        assert tuned.adapter.name == "bank"
        gains.append(tuned.scores[0].total_logprob - base.scores[0].total_logprob)
    assert sum(gains) > 0, gains


async def test_a_corrupt_registry_record_does_not_break_listing(stub, inference):
    _, core = inference
    tenant = new_tenant()
    await register(stub, tenant, name="good")
    redis = core.registry._redis
    await redis.hset(f"lp:{{{tenant}}}:adapter:broken:versions", "1", b'{"name": "broken"}')
    await redis.hset(f"lp:{{{tenant}}}:adapters", "broken", 1)
    listed = await stub.ListAdapters(pb.ListAdaptersRequest(tenant=tenant))
    assert [a.name for a in listed.adapters if not a.shared] == ["good"]
    await expect_error(stub.Generate(generate_request(tenant, "broken")), grpc.StatusCode.NOT_FOUND)


async def test_generate_stream_pieces_add_up_to_generate(stub):
    tenant = new_tenant()
    await register(stub, tenant)
    request = generate_request(tenant, "support", max_new_tokens=24)
    whole = await stub.Generate(request)
    messages = [m async for m in stub.GenerateStream(request)]
    assert len(messages) > 2 and messages[-1].HasField("final")
    assert not any(m.HasField("final") for m in messages[:-1])
    assert "".join(m.text for m in messages) == whole.text == messages[-1].final.text
    assert messages[-1].final.adapter.version == whole.adapter.version == 1
    assert messages[-1].final.usage == whole.usage


async def test_generate_stream_refusals_come_before_any_text(stub):
    messages = []
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for message in stub.GenerateStream(generate_request(new_tenant(), "missing")):
            messages.append(message)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND and not messages


async def test_concurrent_generations_share_decode_steps(stub, inference):
    _, core = inference
    tenant = new_tenant()
    await register(stub, tenant)
    steps = core.scheduler.steps
    requests = [
        generate_request(tenant, "support" if i % 2 else "", max_new_tokens=16, prompt=f"{i}: ")
        for i in range(8)
    ]
    replies = await asyncio.gather(*(stub.Generate(r) for r in requests))
    assert all(r.usage.completion_tokens for r in replies)
    tokens = sum(r.usage.completion_tokens for r in replies)
    assert core.scheduler.steps - steps < tokens / 2  # rows decoded together, not in turn


async def test_full_queue_is_resource_exhausted(stub, redis_url, tmp_path):
    settings = InferenceSettings(
        port=0,
        redis_url=redis_url,
        adapter_store_dir=tmp_path,
        max_batch_size=1,
        max_queued_requests=1,
        shutdown_grace_seconds=1,
    )
    redis = connect(redis_url)
    server, core = create_server(settings, redis)
    await server.start()
    await core.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            small = pb_grpc.InferenceServiceStub(channel)
            request = generate_request(new_tenant(), max_new_tokens=64)
            outcomes = await asyncio.gather(
                *(small.Generate(request) for _ in range(8)), return_exceptions=True
            )
    finally:
        await server.stop()
        core.close()
        await redis.aclose()
    refused = [o for o in outcomes if isinstance(o, grpc.aio.AioRpcError)]
    # One row decoding and one request waiting: the others are turned away at once.
    assert len(refused) >= 5
    assert {(e.code(), error_reason(e)) for e in refused} == {
        (grpc.StatusCode.RESOURCE_EXHAUSTED, "QUEUE_FULL")
    }
    assert all(o.usage.completion_tokens for o in outcomes if o not in refused)
