"""Shared fixtures: a real redis-server on a free port for the whole session."""

from __future__ import annotations

import tempfile
from collections.abc import AsyncIterator, Iterator

import pytest
import redis.asyncio as aioredis

from services.common.localhost import free_port, start_redis_server


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    port = free_port()
    workdir = tempfile.mkdtemp(prefix="loraplex-test-redis-")
    proc = start_redis_server(port, workdir)
    url = f"redis://127.0.0.1:{port}/0"
    yield url
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture
async def redis_client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url)
    await client.flushdb()
    yield client
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
