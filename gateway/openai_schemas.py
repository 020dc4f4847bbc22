"""Request bodies of the OpenAI-compatible routes, and model-name resolution.

The gateway checks only the HTTP shape: that values fit their proto fields and that no
option is set which would be silently ignored. Ranges and limits (temperature, the
max_new_tokens ceiling, whether an adapter exists) are the inference service's to judge.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from gateway.fields import INT32_MAX, UINT32_MAX, Float, UInt64
from gateway.structured_outputs import StructuredOutputFields
from loraplex.common.v1 import common_pb2
from loraplex.inference.v1 import inference_service_pb2 as pb
from services.common.errors import InvalidArgument

_VERSIONED = re.compile(r"^(?P<name>.+)@(?P<version>[0-9]+)$")

# At least 1 here: 0 in the proto means "as many as fit", which only an absent field asks for.
MaxTokens = Annotated[int, Field(ge=1, le=INT32_MAX)]


def parse_model(model: str, base_model_id: str) -> common_pb2.AdapterRef:
    """The OpenAI `model` field -> the adapter to use: the base model's id selects no
    adapter, "name@3" pins version 3, any other string is an adapter's current version."""
    if model == base_model_id:
        return common_pb2.AdapterRef()
    match = _VERSIONED.fullmatch(model)
    if match is None:
        return common_pb2.AdapterRef(name=model, version=0)
    version = int(match["version"])
    if version > UINT32_MAX:
        raise InvalidArgument(
            f"adapter version {version} is out of range", reason="INVALID_ADAPTER_VERSION"
        )
    return common_pb2.AdapterRef(name=match["name"], version=version)


class CompositionPart(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # An adapter name, or "name@version" to pin a version.
    adapter: str = Field(min_length=1)
    weight: Float = 1.0


class CompositionIn(BaseModel):
    """Several adapters mixed for one request (PEFT add_weighted_adapter's methods)."""

    model_config = ConfigDict(extra="forbid")

    adapters: list[CompositionPart] = Field(min_length=1)
    method: Literal["cat", "svd", "linear", "ties", "dare_linear", "dare_ties"] = "cat"
    density: Float | None = None
    svd_rank: Annotated[int, Field(ge=1, le=INT32_MAX)] | None = None
    majority_sign_method: Literal["total", "frequency"] = "total"
    seed: UInt64 | None = None

    def to_proto(self, base_model_id: str) -> pb.Composition:
        return pb.Composition(
            parts=[
                pb.Composition.Part(adapter=parse_model(p.adapter, base_model_id), weight=p.weight)
                for p in self.adapters
            ],
            method=self.method,
            density=self.density,
            svd_rank=self.svd_rank,
            majority_sign_method=self.majority_sign_method,
            seed=self.seed,
        )


class StreamOptions(BaseModel):
    include_usage: bool = False


class OpenAIRequest(BaseModel):
    """The fields a subclass declares are the ones the gateway honours, and the only ones:
    any other field is refused by name (400), unless its value is null, false, 0 or empty,
    which for every OpenAI option is its default (clients send those)."""

    model_config = ConfigDict(extra="allow")

    @model_validator(mode="after")
    def _reject_unsupported(self) -> OpenAIRequest:
        used = sorted(name for name, value in (self.model_extra or {}).items() if value)
        if used:
            raise ValueError(f"not supported: {', '.join(used)}")
        return self


class GenerationRequest(OpenAIRequest):
    model: str = Field(min_length=1)
    temperature: Float | None = None
    top_p: Float | None = None
    seed: UInt64 | None = None
    stop: str | list[str] | None = None
    n: int | None = 1
    stream: bool | None = False
    # OpenAI's {"include_usage": true} adds a last chunk with the token usage.
    stream_options: StreamOptions | None = None
    user: str | None = None
    # loraplex: mix several adapters for this request; `model` is then the base model's id
    # (the openai client sends it with extra_body={"composition": {...}}).
    composition: CompositionIn | None = None

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n: int | None) -> int | None:
        if n not in (None, 1):
            raise ValueError("only n=1 is supported")
        return n

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def sampling_params(self, max_tokens: int) -> pb.SamplingParams:
        stop = [self.stop] if isinstance(self.stop, str) else self.stop or []
        return pb.SamplingParams(
            max_new_tokens=max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            seed=self.seed,
            stop=stop,
        )


class CompletionRequest(GenerationRequest):
    prompt: str
    max_tokens: MaxTokens | None = None

    DEFAULT_MAX_TOKENS: ClassVar[int] = 16  # OpenAI's default for completions

    @field_validator("prompt", mode="before")
    @classmethod
    def _single_prompt(cls, prompt: Any) -> Any:
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise ValueError("prompt must be a string or a list of exactly one string")
        return prompt


class ChatMessageIn(BaseModel):
    # "developer" is what newer OpenAI clients send in place of "system".
    role: Literal["system", "developer", "user", "assistant"]
    content: str

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts(cls, content: Any) -> Any:
        """Content given as [{"type": "text", "text": ...}, ...] is joined into one string."""
        if not isinstance(content, list):
            return content
        if not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
            raise ValueError("only text content parts are supported")
        return "".join(str(p.get("text", "")) for p in content)

    def to_proto(self) -> pb.ChatMessage:
        role = "system" if self.role == "developer" else self.role
        return pb.ChatMessage(role=role, content=self.content)


class ChatCompletionRequest(GenerationRequest, StructuredOutputFields):
    messages: list[ChatMessageIn] = Field(min_length=1)
    max_tokens: MaxTokens | None = None
    # The newer name of max_tokens; either may be sent.
    max_completion_tokens: MaxTokens | None = None
