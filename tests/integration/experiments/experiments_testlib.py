"""Helpers for the experiments tests (a unique basename, so importable from test files)."""

from __future__ import annotations

import json
import uuid

import redis.asyncio as aioredis

from services.common.keys import adapter_index, adapter_versions


def new_tenant() -> str:
    return f"x-{uuid.uuid4().hex[:10]}"


async def register_adapter(redis: aioredis.Redis, owner: str, name: str, version: int = 1):
    """A registry entry shaped like the inference registry's (the experiments service only
    reads that it exists). Tests share one Redis with the inference tests: keep records
    complete, and remove platform ones when done (unregister_adapter)."""
    record = {
        "owner": owner,
        "name": name,
        "sha256": "0" * 64,
        "rank": 4,
        "lora_alpha": 8.0,
        "target_modules": ["q_proj"],
        "size_bytes": 1,
        "created_at": 0.0,
    }
    await redis.hset(adapter_versions(owner, name), str(version), json.dumps(record))
    await redis.hset(adapter_index(owner), name, version)


async def unregister_adapter(redis: aioredis.Redis, owner: str, name: str) -> None:
    await redis.hdel(adapter_index(owner), name)
    await redis.delete(adapter_versions(owner, name))
