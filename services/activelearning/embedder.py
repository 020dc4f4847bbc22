"""Model embeddings of candidates from the inference service's Embed RPC.

Candidates are embedded under the base model (no adapter), so that vectors of outputs of
different adapters share one space and compare. Best effort: any failure (inference down,
slow, a model whose hidden size is not the service's embedding_dim) returns None, and the
caller falls back to hashed character n-grams; after a failure the service is not asked
again for `retry_seconds`, so a dead inference service costs SubmitCandidates nothing.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence

import grpc
import numpy as np

from loraplex.inference.v1 import inference_service_pb2 as ipb
from loraplex.inference.v1 import inference_service_pb2_grpc as ipb_grpc

log = logging.getLogger(__name__)

# The inference service's limit of texts per Embed call.
EMBED_BATCH = 256


class ModelEmbedder:
    def __init__(
        self,
        channel: grpc.aio.Channel,
        dim: int,
        *,
        timeout_seconds: float = 5.0,
        retry_seconds: float = 30.0,
    ) -> None:
        self.stub = ipb_grpc.InferenceServiceStub(channel)
        self.dim = dim
        self.timeout_seconds = timeout_seconds
        self.retry_seconds = retry_seconds
        self._skip_until = 0.0

    async def embed(self, tenant: str, texts: Sequence[str]) -> tuple[np.ndarray | None, str]:
        """([len(texts), dim] unit float32 rows, "") or (None, why not)."""
        if not texts:
            return np.zeros((0, self.dim), np.float32), ""
        if time.monotonic() < self._skip_until:
            return None, "backoff"
        try:
            rows = await asyncio.wait_for(self._embed(tenant, texts), self.timeout_seconds)
        except (grpc.aio.AioRpcError, TimeoutError, ValueError) as err:
            why = _reason(err)
            self._skip_until = time.monotonic() + self.retry_seconds
            log.warning(
                "model embeddings unavailable, using hashed n-grams",
                extra={"reason": why, "error": str(err), "retry_seconds": self.retry_seconds},
            )
            return None, why
        return rows, ""

    async def _embed(self, tenant: str, texts: Sequence[str]) -> np.ndarray:
        out = []
        for start in range(0, len(texts), EMBED_BATCH):
            reply = await self.stub.Embed(
                ipb.EmbedRequest(
                    tenant=tenant, texts=list(texts[start : start + EMBED_BATCH]), truncate=True
                )
            )
            if reply.dimension != self.dim:
                raise ValueError(
                    f"the model's embeddings have {reply.dimension} values, "
                    f"embedding_dim is {self.dim}"
                )
            out.append(np.asarray([e.values for e in reply.embeddings], dtype=np.float32))
        rows = np.concatenate(out)
        if rows.shape != (len(texts), self.dim) or not np.isfinite(rows).all():
            raise ValueError("malformed Embed reply")
        return rows


def _reason(err: Exception) -> str:
    if isinstance(err, grpc.aio.AioRpcError):
        return err.code().name.lower()
    return "timeout" if isinstance(err, TimeoutError) else "bad_reply"
