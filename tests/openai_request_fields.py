"""OpenAI's request fields per endpoint, as the installed `openai` package defines them, and
the gateway's request model for each: what the gateway honours is what the model declares."""

from __future__ import annotations

import typing

import openai.types
import openai.types.chat
from pydantic import BaseModel

from gateway.embeddings_routes import EmbeddingRequest
from gateway.openai_schemas import ChatCompletionRequest, CompletionRequest

ENDPOINTS: dict[str, tuple[object, type[BaseModel]]] = {
    "/v1/completions": (openai.types.CompletionCreateParams, CompletionRequest),
    "/v1/chat/completions": (openai.types.chat.CompletionCreateParams, ChatCompletionRequest),
    "/v1/embeddings": (openai.types.EmbeddingCreateParams, EmbeddingRequest),
}


def openai_fields(path: str) -> list[str]:
    """The request fields of the endpoint's params TypedDict (a union of them for streaming
    and not), base classes included."""
    params, _ = ENDPOINTS[path]
    names: set[str] = set()
    for typed_dict in typing.get_args(params) or (params,):
        for klass in typed_dict.__mro__:
            names |= set(getattr(klass, "__annotations__", {}))
    return sorted(names)


def honoured(path: str) -> set[str]:
    """The fields the gateway's request model for the endpoint declares."""
    return set(ENDPOINTS[path][1].model_fields)
