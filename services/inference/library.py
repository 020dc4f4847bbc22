"""The library API: `from services import RealtimeCompositor, get_compositor`.

The inference service's domain layer in-process (no gRPC, no server): register adapters,
generate with one adapter or a weighted composition of several, stream, hot-swap and read
the cache statistics. Concurrent generate() calls share the continuous-batching scheduler,
exactly as requests to the service do.

    async with get_compositor() as compositor:  # the default model, an embedded Redis
        await compositor.register("acme", "support", "models/adapters/retailer")
        reply = await compositor.generate("acme", "Customer: Hi\\nAgent:", adapter="support")
        mixed = await compositor.generate(
            "acme", "Customer: Hi\\nAgent:", compose=[("support", 0.7), ("billing", 0.3)]
        )
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis

from services.common.names import check_adapter_name
from services.common.redis import EmbeddedRedis, connect
from services.inference.cache import CacheSnapshot
from services.inference.core import (
    CompositionRequest,
    GenerateResult,
    InferenceCore,
    SamplingRequest,
)
from services.inference.registry import AdapterRecord, SwapResult
from services.inference.settings import InferenceSettings

__all__ = ["GenerateResult", "RealtimeCompositor", "get_compositor"]

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def _ref(adapter: str) -> tuple[str, int]:
    """ "name" -> (name, 0: the serving version); "name@3" -> (name, 3)."""
    name, at, version = adapter.rpartition("@")
    return (name, int(version)) if at and version.isdigit() else (adapter, 0)


class RealtimeCompositor:
    """Multi-adapter generation in-process; all methods are coroutines. Call start() (or use
    `async with`) before generating: it loads the base model."""

    def __init__(
        self,
        redis: aioredis.Redis | str | None = None,
        settings: InferenceSettings | None = None,
    ) -> None:
        self.settings = settings or InferenceSettings()
        url = redis if isinstance(redis, str) else self.settings.redis_url
        self._embedded = EmbeddedRedis() if redis is None and url is None else None
        if isinstance(redis, aioredis.Redis):
            self.redis, self._owns_redis = redis, False
        else:
            self.redis = connect(url or self._embedded.url)
            self._owns_redis = True
        self.core = InferenceCore(self.settings, self.redis)

    async def start(self) -> RealtimeCompositor:
        await self.core.start()
        return self

    async def register(
        self, tenant: str, name: str, directory: str | Path, *, shared: bool = False
    ) -> AdapterRecord:
        """Register a PEFT adapter directory (safetensors only) as the next version of
        `name`; it serves new requests at once."""
        check_adapter_name(name)
        folder = Path(directory)
        files = {f: (folder / f).read_bytes() for f in ADAPTER_FILES if (folder / f).is_file()}
        owner = "" if shared else tenant
        return await self.core.register_adapter(owner, name, 0, files, shared=shared)

    async def generate(
        self,
        tenant: str,
        prompt: str = "",
        *,
        messages: list[dict[str, str]] | None = None,
        **options: Any,
    ) -> GenerateResult:
        """Generate from a prompt (or chat messages). Options:
        adapter: "name" or "name@version" ("" = the base model);
        compose: [(adapter, weight), ...] to mix several adapters, with method ("cat",
            "svd", "linear", "ties", "dare_linear", "dare_ties"), density, svd_rank,
            majority_sign_method and compose_seed as PEFT's add_weighted_adapter takes them;
        max_new_tokens (64), temperature, top_p, seed, stop."""
        return await self.core.generate(
            **self._request(tenant, **options), prompt=prompt, messages=messages
        )

    async def stream(
        self,
        tenant: str,
        prompt: str = "",
        *,
        messages: list[dict[str, str]] | None = None,
        **options: Any,
    ) -> AsyncIterator[str]:
        """The same as generate(), yielding the text as it is decoded."""
        request = self._request(tenant, **options)
        async for _, chunk in self.core.generate_stream(
            **request, prompt=prompt, messages=messages
        ):
            if chunk.text:
                yield chunk.text

    @staticmethod
    def _request(
        tenant: str,
        *,
        adapter: str = "",
        compose: Sequence[tuple[str, float]] = (),
        method: str = "cat",
        density: float | None = None,
        svd_rank: int | None = None,
        majority_sign_method: str = "total",
        compose_seed: int | None = None,
        max_new_tokens: int = 64,
        temperature: float | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        stop: Sequence[str] = (),
    ) -> dict[str, Any]:
        name, version = _ref(adapter)
        mix = None
        if compose:
            parts = tuple((*_ref(a), float(w)) for a, w in compose)
            mix = CompositionRequest(
                parts, method, density, svd_rank, majority_sign_method, compose_seed
            )
        return {
            "tenant": tenant,
            "adapter_name": name,
            "adapter_version": version,
            "params": SamplingRequest(max_new_tokens, temperature, top_p, seed, tuple(stop)),
            "composition": mix,
        }

    async def swap(
        self, tenant: str, name: str, version: int, expected_sha256: str = ""
    ) -> SwapResult:
        """Serve another registered version of `name` from now on (every replica on the same
        Redis hears of it); running generations finish on the version they started with."""
        return await self.core.hot_swap.swap(tenant, name, version, expected_sha256)

    async def rollback(self, tenant: str, name: str) -> SwapResult:
        """Serve the version that served before the last swap again."""
        return await self.core.hot_swap.rollback(tenant, name)

    def cache_stats(self) -> list[CacheSnapshot]:
        """Per tier (device first when the model runs on a GPU): entries, bytes, hits..."""
        return self.core.cache_stats()

    async def close(self) -> None:
        self.core.close()
        if self._owns_redis:
            await self.redis.aclose()
        if self._embedded is not None:
            self._embedded.close()

    async def __aenter__(self) -> RealtimeCompositor:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def get_compositor(
    redis_url: str | None = None, settings: InferenceSettings | None = None
) -> RealtimeCompositor:
    """A RealtimeCompositor on redis_url, else the settings' REDIS_URL (config/inference.yaml
    and config/composition.yaml, overridden by the environment), else an embedded Redis."""
    return RealtimeCompositor(redis_url, settings)
