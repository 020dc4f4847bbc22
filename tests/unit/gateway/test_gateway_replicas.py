"""Routing across inference replicas: the hashing (against a computation written here from
the definitions), start-up validation of the replica list, retries and the 503 when no
replica answers (fake inference servers on real gRPC; real Redis)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator

import httpx
import pytest
import redis.asyncio as aioredis
from pydantic import ValidationError

from gateway.app import create_app
from gateway.replicas import (
    InferenceReplicas,
    ReplicaSource,
    bounded_choice,
    parse_replicas,
    rendezvous_rank,
    routing_key,
)
from gateway.settings import GatewaySettings
from loraplex.common.v1 import common_pb2
from loraplex.inference.v1 import inference_service_pb2 as pb
from services.common.channels import open_channel
from services.common.errors import Unavailable
from services.common.localhost import free_port
from services.common.settings import REPO_ROOT
from tests.helpers import eventually
from tests.unit.gateway.fake_inference import (
    BASE_MODEL,
    FakeInferenceServer,
    NewTenant,
    adapter_info,
    assert_error,
    gateway_settings,
    serve_fake_inference,
)

REPLICAS = ["10.0.0.1:50051", "10.0.0.2:50051", "10.0.0.3:50051", "10.0.0.4:50051"]
KEYS = [f"tenant-{i % 7}/adapter-{i}@0" for i in range(2000)]


def owner_by_definition(key: str, replicas: list[str]) -> str:
    """Rendezvous hashing written out: the replica with the largest 64-bit blake2b of
    key NUL address wins."""
    weights = {
        r: int(hashlib.blake2b(f"{key}\0{r}".encode(), digest_size=8).hexdigest(), 16)
        for r in replicas
    }
    return max(replicas, key=lambda r: weights[r])


def test_each_key_goes_to_the_replica_the_definition_names_whatever_the_list_order() -> None:
    for key in KEYS[:200]:
        expected = owner_by_definition(key, REPLICAS)
        assert rendezvous_rank(key, REPLICAS)[0] == expected
        assert rendezvous_rank(key, list(reversed(REPLICAS)))[0] == expected


def test_keys_spread_over_the_replicas() -> None:
    owners = Counter(rendezvous_rank(key, REPLICAS)[0] for key in KEYS)
    assert set(owners) == set(REPLICAS)
    # 2000 keys over 4 replicas: 500 each expected; binomial sd ~19, so 400-600 is > 5 sd.
    assert all(400 <= n <= 600 for n in owners.values()), owners


def test_removing_a_replica_moves_only_its_keys() -> None:
    before = {key: rendezvous_rank(key, REPLICAS)[0] for key in KEYS}
    removed = REPLICAS[2]
    remaining = [r for r in REPLICAS if r != removed]
    after = {key: rendezvous_rank(key, remaining)[0] for key in KEYS}
    moved = {key for key in KEYS if before[key] != after[key]}
    assert moved == {key for key in KEYS if before[key] == removed}
    for key in moved:  # each lands on its own second choice
        assert after[key] == owner_by_definition(key, remaining)
    assert set(Counter(after[k] for k in moved)) == set(remaining)  # spread, not dumped


@pytest.mark.parametrize(
    ("in_flight", "epsilon", "expected"),
    [
        # total = 3 + 0 + 1 = 4; bound = ceil(1.25 * 4 / 2) = 3: a (3) is full, b serves
        ({"a": 3, "b": 0}, 0.25, "b"),
        # total = 2; bound = ceil(1.25 * 2 / 2) = 2: a (1) is under it
        ({"a": 1, "b": 0}, 0.25, "a"),
        # total = 4; bound = ceil(2 * 4 / 2) = 4: a (3) is under it
        ({"a": 3, "b": 0}, 1.0, "a"),
        # total = 9; bound = ceil(1.25 * 9 / 3) = 4: a (4) full, b (4) full, c serves
        ({"a": 4, "b": 4, "c": 0}, 0.25, "c"),
    ],
)
def test_bounded_load_passes_over_a_full_replica(in_flight, epsilon, expected) -> None:
    ranked = sorted(in_flight)
    assert bounded_choice(ranked, in_flight, epsilon) == expected


@pytest.mark.parametrize(
    ("in_flight", "expected"),
    [
        ({"a": 7, "b": 0}, "a"),  # bound = max(ceil(1.25 * 8 / 2) = 5, 8) = 8: a (7) is under
        ({"a": 8, "b": 0}, "b"),  # bound = max(ceil(1.25 * 9 / 2) = 6, 8) = 8: a (8) is full
        ({"a": 12, "b": 2}, "b"),  # bound = max(ceil(1.25 * 15 / 2) = 10, 8) = 10
        ({"a": 9, "b": 2}, "b"),  # bound = max(ceil(1.25 * 12 / 2) = 8, 8) = 8: a (9) is full
    ],
)
def test_under_the_floor_a_replica_is_never_passed_over(in_flight, expected) -> None:
    assert bounded_choice(["a", "b"], in_flight, 0.25, floor=8) == expected


def test_a_hot_key_spills_to_its_second_replica_and_comes_back() -> None:
    two = REPLICAS[:2]
    replicas = InferenceReplicas(
        ReplicaSource(addresses=tuple(two)), open_channel=open_channel, load_factor=0.25
    )
    replicas._update(two)
    key = KEYS[0]
    first, second = (replicas._replicas[a] for a in rendezvous_rank(key, two))
    placed = []
    for _ in range(8):  # a burst of one adapter's requests, none finished yet
        replica = replicas.choose(key)
        replica.in_flight += 1
        placed.append(replica)
    # By hand, bound = ceil(1.25 * (requests so far + 1) / 2): 1, 2, 2, 3, 4, 4, 5, 5; the
    # first replica serves while its count is under the bound, else the second does.
    F, S = first, second
    assert placed == [F, F, S, F, F, S, F, S]
    for replica in placed:
        replica.in_flight -= 1
    assert replicas.choose(key) is first  # load gone: back to its own replica


def test_routing_key_follows_the_adapter_or_the_composition_parts() -> None:
    def ref(name: str, version: int = 0) -> common_pb2.AdapterRef:
        return common_pb2.AdapterRef(name=name, version=version)

    def mix(*names: str) -> pb.Composition:
        return pb.Composition(parts=[pb.Composition.Part(adapter=ref(n), weight=1) for n in names])

    assert routing_key(pb.GenerateRequest(tenant="bank", adapter=ref("fraud"))) == "bank/fraud@0"
    assert routing_key(pb.GenerateRequest(tenant="bank")) == ""  # the base model
    ab = routing_key(pb.GenerateRequest(tenant="bank", composition=mix("a", "b")))
    ba = routing_key(pb.GenerateRequest(tenant="bank", composition=mix("b", "a")))
    assert ab == ba == "bank/a@0+b@0"
    other = routing_key(pb.GenerateRequest(tenant="shop", adapter=ref("fraud")))
    assert other != routing_key(pb.GenerateRequest(tenant="bank", adapter=ref("fraud")))


# -- start-up validation ------------------------------------------------------------------


def test_a_replica_list_is_parsed() -> None:
    source = parse_replicas(" 10.0.0.1:50051, [::1]:50052,inference-0.inference.ns:50051 ")
    assert source.addresses == ("10.0.0.1:50051", "[::1]:50052", "inference-0.inference.ns:50051")
    dns = parse_replicas("dns:///inference-headless.loraplex.svc:50051")
    assert (dns.dns_name, dns.dns_port, dns.addresses) == (
        "inference-headless.loraplex.svc",
        50051,
        (),
    )


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ("a:1,b:2,a:1", "listed twice"),
        ("Inference:50051,inference:50051", "listed twice"),
        ("inference", "is not host:port"),
        ("inference:0", "port must be a number from 1 to 65535"),
        ("inference:65536", "port must be a number from 1 to 65535"),
        ("inference:http", "port must be a number from 1 to 65535"),
        ("in ference:50051", "is not a host name or IP address"),
        ("[nope]:50051", "is not an IPv6 address"),
        ("a:1,,b:2", "empty entry"),
        (" , ", "is empty"),
        ("", "is empty"),
        ("dns:///:50051", "is not host:port"),
    ],
)
def test_a_bad_replica_list_is_refused_with_the_reason(value: str, says: str) -> None:
    with pytest.raises(ValidationError, match=says):
        GatewaySettings(inference_addresses=value)


def test_the_gateway_refuses_to_start_with_a_duplicate_replica() -> None:
    env = {**os.environ, "INFERENCE_ADDRESSES": "10.0.0.1:50051,10.0.0.1:50051"}
    done = subprocess.run(
        [sys.executable, "-m", "gateway"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0
    assert "inference replica '10.0.0.1:50051' is listed twice" in done.stderr


# -- calls across replicas ----------------------------------------------------------------


@pytest.fixture
async def second() -> AsyncIterator[FakeInferenceServer]:
    async with serve_fake_inference() as server:
        yield server


async def routed_client(
    addresses: list[str], redis: aioredis.Redis
) -> tuple[httpx.AsyncClient, InferenceReplicas]:
    settings = gateway_settings(addresses[0]).model_copy(
        update={
            "inference_addresses": ",".join(addresses),
            "replica_down_seconds": 60,
            "replica_probe_seconds": 60,
        }
    )
    replicas = InferenceReplicas.from_settings(settings, open_channel)
    await replicas.start()
    app = create_app(settings, redis=redis, inference=replicas)
    transport = httpx.ASGITransport(app, raise_app_exceptions=False)
    return httpx.AsyncClient(transport=transport, base_url="http://gateway"), replicas


def completion(model: str, stream: bool = False) -> dict:
    return {"model": model, "prompt": "hi", "max_tokens": 4, "stream": stream}


async def test_an_adapter_s_requests_stay_on_one_replica(
    inference: FakeInferenceServer,
    second: FakeInferenceServer,
    redis_client: aioredis.Redis,
    new_tenant: NewTenant,
) -> None:
    names = [f"a{i}" for i in range(12)]
    for fake in (inference.fake, second.fake):
        fake.adapters += [adapter_info("bank", n) for n in names]
    headers = await new_tenant("bank")
    client, replicas = await routed_client([inference.addr, second.addr], redis_client)
    async with client:
        for _ in range(3):
            for name in names:
                reply = await client.post("/v1/completions", json=completion(name), headers=headers)
                assert reply.status_code == 200, reply.text
    await replicas.close()
    served = {
        addr: Counter(r.adapter.name for r in fake.requests["Generate"])
        for addr, fake in ((inference.addr, inference.fake), (second.addr, second.fake))
    }
    for name in names:
        expected = owner_by_definition(f"bank/{name}@0", [inference.addr, second.addr])
        assert served[expected][name] == 3  # all three of its requests, on its replica
    assert all(served.values())  # both replicas got some adapters


@pytest.mark.parametrize("stream", [False, True])
async def test_a_request_is_retried_on_another_replica_when_its_own_is_down(
    inference: FakeInferenceServer,
    redis_client: aioredis.Redis,
    new_tenant: NewTenant,
    stream: bool,
) -> None:
    dead = f"127.0.0.1:{free_port()}"  # nothing listens there
    # Adapters whose first choice is the dead replica: each is retried on the live one.
    names = [f"a{i}" for i in range(40)]
    names = [n for n in names if owner_by_definition(f"bank/{n}@0", [dead, inference.addr]) == dead]
    inference.fake.adapters += [adapter_info("bank", n) for n in names]
    headers = await new_tenant("bank")
    client, replicas = await routed_client([dead, inference.addr], redis_client)
    async with client:
        for name in names[:3]:
            reply = await client.post(
                "/v1/completions", json=completion(name, stream), headers=headers
            )
            assert reply.status_code == 200, reply.text
            if stream:
                assert reply.text.rstrip().endswith("data: [DONE]")
            else:
                assert reply.json()["choices"][0]["text"] == "echo:hi"
    assert await eventually(lambda: all(r.in_flight == 0 for r in replicas._replicas.values()))
    await replicas.close()
    method = "GenerateStream" if stream else "Generate"
    assert [r.adapter.name for r in inference.fake.requests[method]] == names[:3]
    assert [r.address for r in replicas.live()] == [inference.addr]  # the dead one is down


async def test_no_replica_reachable_is_a_quick_503_with_its_reason(
    redis_client: aioredis.Redis, new_tenant: NewTenant
) -> None:
    dead = [f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"]
    headers = await new_tenant("bank")
    client, replicas = await routed_client(dead, redis_client)
    async with client:
        for _ in range(2):  # first: both tried and failed; then: both known to be down
            reply = await client.post("/v1/completions", json=completion("x"), headers=headers)
            error = assert_error(reply, 503, "UNAVAILABLE")
            assert [d["reason"] for d in error["details"]] == ["NO_REPLICA"]
            assert reply.headers["Retry-After"] == "1"
            assert "127.0.0.1" not in reply.text  # replica addresses stay internal
        ready = await client.get("/readyz")
        assert ready.status_code == 503
    await replicas.close()


async def test_cache_statistics_add_up_every_replica(
    inference: FakeInferenceServer,
    second: FakeInferenceServer,
    redis_client: aioredis.Redis,
    admin: dict[str, str],
) -> None:
    client, replicas = await routed_client([inference.addr, second.addr], redis_client)
    async with client:
        reply = await client.get("/admin/cache", headers=admin)
    await replicas.close()
    assert reply.status_code == 200, reply.text
    body = reply.json()
    # Each fake reports hits=10, misses=2, one cached adapter bank/fraud@2.
    assert (body["hits"], body["misses"], body["entries"]) == (20, 4, 2)
    assert [(a["name"], a["version"]) for a in body["adapters"]] == [("fraud", 2)]
    assert sorted(r["address"] for r in body["replicas"]) == sorted([inference.addr, second.addr])


async def test_a_replica_marked_down_is_back_once_its_health_check_says_serving(
    inference: FakeInferenceServer,
) -> None:
    replicas = InferenceReplicas(
        parse_replicas(inference.addr),
        open_channel=open_channel,
        down_seconds=600,
        probe_seconds=0.05,
    )
    await replicas.start()
    try:
        (replica,) = replicas._replicas.values()
        await inference.set_serving(False)
        replica.down_until = time.monotonic() + 600  # as after a failed call
        assert not await eventually(replicas.live, timeout=0.5)  # NOT_SERVING: stays out
        await inference.set_serving(True)
        assert await eventually(replicas.live, timeout=10) == [replica]
    finally:
        await replicas.close()


async def test_dns_mode_finds_the_replicas_behind_a_name(
    inference: FakeInferenceServer,
) -> None:
    port = inference.addr.rsplit(":", 1)[1]
    replicas = InferenceReplicas(
        parse_replicas(f"dns:///localhost:{port}"), open_channel=open_channel
    )
    await replicas.start()
    try:
        assert f"127.0.0.1:{port}" in replicas.addresses
        reply = await replicas.GetModelInfo(pb.GetModelInfoRequest())
        assert reply.model_id == BASE_MODEL
    finally:
        await replicas.close()


async def test_a_stream_the_client_leaves_no_longer_counts_as_load(
    inference: FakeInferenceServer,
) -> None:
    inference.fake.adapters.append(adapter_info("bank", "fraud"))
    replicas = InferenceReplicas(parse_replicas(inference.addr), open_channel=open_channel)
    await replicas.start()
    try:
        (replica,) = replicas._replicas.values()
        request = pb.GenerateRequest(
            tenant="bank",
            adapter=common_pb2.AdapterRef(name="fraud"),
            prompt="hi",
            params=pb.SamplingParams(max_new_tokens=4),
        )
        stream = replicas.GenerateStream(request)
        first = await anext(stream.__aiter__())
        assert first.text and replica.in_flight == 1
        stream.cancel()  # what the gateway does when the HTTP client goes away
        assert await eventually(lambda: replica.in_flight == 0)
    finally:
        await replicas.close()


async def test_a_stream_that_failed_after_its_first_message_is_not_retried(
    inference: FakeInferenceServer,
    second: FakeInferenceServer,
    redis_client: aioredis.Redis,
    new_tenant: NewTenant,
) -> None:
    for server in (inference, second):
        server.fake.adapters.append(adapter_info("bank", "fraud"))
        server.fake.fail["GenerateStream.mid"] = Unavailable("model went away", reason="X")
    headers = await new_tenant("bank")
    client, replicas = await routed_client([inference.addr, second.addr], redis_client)
    async with client:
        reply = await client.post(
            "/v1/completions", json=completion("fraud", stream=True), headers=headers
        )
    await replicas.close()
    assert reply.status_code == 200  # the first piece had been sent
    assert '"code":"UNAVAILABLE"' in reply.text
    sent = len(inference.fake.requests["GenerateStream"]) + len(
        second.fake.requests["GenerateStream"]
    )
    assert sent == 1  # a second replica would have repeated what the client already has
