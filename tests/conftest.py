"""Shared fixtures: a real redis-server on a free port for the whole session, and a real
Redis Cluster (3 masters) started on first use. `redis_url` is the single server here;
tests/integration/conftest.py makes it each of the two in turn."""

from __future__ import annotations

import itertools
import tempfile
from collections.abc import AsyncIterator, Iterator

import pytest
import redis.asyncio as aioredis

from services.common.localhost import RedisCluster, free_port, start_redis_server
from services.common.redis import connect, is_cluster_url
from tests.helpers import database_url


@pytest.fixture(scope="session")
def single_redis_url() -> Iterator[str]:
    port = free_port()
    workdir = tempfile.mkdtemp(prefix="loraplex-test-redis-")
    # Database 0 holds the session-wide servers' state; each redis_client gets its own.
    proc = start_redis_server(port, workdir, "--databases", str(MAX_TEST_DATABASES + 1))
    url = f"redis://127.0.0.1:{port}/0"
    yield url
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture(scope="session")
def cluster_redis_url() -> Iterator[str]:
    """A real Redis Cluster: 3 masters, each slot on one of them, no replicas."""
    cluster = RedisCluster(tempfile.mkdtemp(prefix="loraplex-test-redis-cluster-"))
    yield cluster.url
    cluster.stop()


@pytest.fixture(scope="session")
def redis_url(single_redis_url: str) -> str:
    return single_redis_url


MAX_TEST_DATABASES = 4096
_test_databases = itertools.count(1)


@pytest.fixture
def test_redis_url(redis_url: str) -> str:
    """The URL of an empty database of this test's own on the session's Redis: the test
    sees only its own keys and never touches the session-wide servers' (database 0).
    On the cluster: the cluster's URL (one database, shared)."""
    database = next(_test_databases)
    assert database <= MAX_TEST_DATABASES, "raise MAX_TEST_DATABASES"
    return database_url(redis_url, database)


@pytest.fixture
async def redis_client(test_redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = connect(test_redis_url)
    yield client
    if not is_cluster_url(test_redis_url):
        await client.flushdb()  # its own database: frees memory, touches no one else's
    await client.aclose()


@pytest.fixture(scope="session")
def foreign_adapter_files(tmp_path_factory) -> dict[str, bytes]:
    """A real PEFT adapter trained for a different (randomly initialised) Llama shape."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    model = get_peft_model(
        LlamaForCausalLM(config), LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
    )
    out = tmp_path_factory.mktemp("foreign-adapter")
    model.save_pretrained(out)
    return {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
