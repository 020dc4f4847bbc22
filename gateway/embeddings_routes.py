"""OpenAI's POST /v1/embeddings over the inference service's Embed and EmbedTokens RPCs.

The vectors are the model's (with the adapter `model` names, if any): the masked mean of
the last hidden state, unit length. `encoding_format: base64` is OpenAI's: the float32
values, little-endian, base64-encoded (what the official clients ask for by default).
"""

from __future__ import annotations

import base64
from typing import Annotated, Any, Literal

import numpy as np
from fastapi import APIRouter
from fastapi.responses import JSONResponse
from pydantic import Field

from gateway.deps import CallerDep, GatewayDep
from gateway.fields import INT32_MAX
from gateway.openai_schemas import OpenAIRequest, parse_model
from loraplex.inference.v1 import inference_service_pb2 as pb

router = APIRouter(prefix="/v1", tags=["openai"])

TokenId = Annotated[int, Field(ge=0, le=INT32_MAX)]


class EmbeddingRequest(OpenAIRequest):
    # No `dimensions`: cutting vectors short is meaningful only for models trained for it
    # (Matryoshka), so it is refused like every undeclared field.
    model: str = Field(min_length=1)
    # A text, texts, a token-id list, or token-id lists (at most 256 inputs).
    input: str | list[str] | list[TokenId] | list[list[TokenId]]
    encoding_format: Literal["float", "base64"] = "float"
    user: str | None = None  # accepted; as at OpenAI, no effect on the vectors

    def inputs(self) -> list[str] | list[list[int]]:
        """Texts, or token-id sequences: what one RPC embeds."""
        value = self.input
        if isinstance(value, str):
            return [value]
        if value and all(isinstance(v, int) for v in value):
            return [value]  # type: ignore[list-item]  # one token-id list
        return value  # type: ignore[return-value]


def _encode(values: Any, encoding_format: str) -> list[float] | str:
    if encoding_format == "float":
        return list(values)
    return base64.b64encode(np.asarray(values, dtype="<f4").tobytes()).decode("ascii")


@router.post("/embeddings", response_model=None)
async def create_embeddings(
    body: EmbeddingRequest, caller: CallerDep, gateway: GatewayDep
) -> JSONResponse:
    info = await gateway.model_info()
    adapter = parse_model(body.model, info.model_id)
    inputs = body.inputs()
    if inputs and isinstance(inputs[0], str):
        request = pb.EmbedRequest(tenant=caller.tenant, adapter=adapter, texts=inputs)
        reply = await gateway.inference.Embed(request, timeout=gateway.timeout)
    else:
        sequences = [pb.TokenIds(ids=ids) for ids in inputs]
        request = pb.EmbedTokensRequest(tenant=caller.tenant, adapter=adapter, inputs=sequences)
        reply = await gateway.inference.EmbedTokens(request, timeout=gateway.timeout)
    tokens = sum(e.num_tokens for e in reply.embeddings)
    gateway.charge_tokens(caller, tokens)
    data = [
        {"object": "embedding", "index": i, "embedding": _encode(e.values, body.encoding_format)}
        for i, e in enumerate(reply.embeddings)
    ]
    return JSONResponse(
        {
            "object": "list",
            "data": data,
            "model": body.model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            "loraplex": {"adapter": {"name": reply.adapter.name, "version": reply.adapter.version}},
        }
    )
