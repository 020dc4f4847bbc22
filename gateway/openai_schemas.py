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
# Choices and sequences per prompt: the inference service bounds them by its batch size.
Count = Annotated[int, Field(ge=1, le=UINT32_MAX)]
# OpenAI's bounds: completions return at most 5 alternatives per token, chat 20.
MAX_COMPLETION_LOGPROBS = 5
MAX_CHAT_TOP_LOGPROBS = 20


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
    # Choices per prompt, decoded as rows of one batch; choice i samples with seed + i.
    n: Count | None = None
    stream: bool | None = False
    # OpenAI's {"include_usage": true} adds a last chunk with the token usage.
    stream_options: StreamOptions | None = None
    user: str | None = None
    # loraplex: mix several adapters for this request; `model` is then the base model's id
    # (the openai client sends it with extra_body={"composition": {...}}).
    composition: CompositionIn | None = None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def choices_per_prompt(self) -> int:
        return self.n or 1

    def logprob_params(self) -> dict[str, Any]:
        """SamplingParams' log-probability and best_of fields, as each route names them."""
        return {}

    def sampling_params(self, max_tokens: int) -> pb.SamplingParams:
        stop = [self.stop] if isinstance(self.stop, str) else self.stop or []
        return pb.SamplingParams(
            max_new_tokens=max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            seed=self.seed,
            stop=stop,
            n=self.choices_per_prompt,
            **self.logprob_params(),
        )


class CompletionRequest(GenerationRequest):
    # A string, a list of strings, a list of token ids, or a list of token-id lists.
    prompt: str | list[str] | list[int] | list[list[int]]
    # 0 only with echo: the prompt's log-probabilities and nothing generated.
    max_tokens: Annotated[int, Field(ge=0, le=INT32_MAX)] | None = None
    # Alternatives per token (0-5), with each token's own log-probability.
    logprobs: Annotated[int, Field(ge=0, le=MAX_COMPLETION_LOGPROBS)] | None = None
    # Return the prompt before the completion (and its tokens' log-probabilities).
    echo: bool = False
    # Sequences generated per prompt; the n with the highest cumulative log-probability
    # are returned.
    best_of: Count | None = None

    DEFAULT_MAX_TOKENS: ClassVar[int] = 16  # OpenAI's default for completions

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt_shape(cls, prompt: Any) -> Any:
        """One clear message for every wrong shape (the union's would list each member)."""
        if isinstance(prompt, str) or (
            isinstance(prompt, list)
            and prompt
            and (
                all(isinstance(p, str) for p in prompt)
                or _token_ids(prompt)
                or all(isinstance(p, list) and _token_ids(p) for p in prompt)
            )
        ):
            return prompt
        raise ValueError(
            "prompt must be a string, a list of strings, a list of token ids or a list of "
            f"non-empty token-id lists (ids from 0 to {INT32_MAX})"
        )

    @model_validator(mode="after")
    def _choices_and_echo(self) -> CompletionRequest:
        n, best_of = self.choices_per_prompt, self.best_of
        if best_of is not None and best_of < n:
            raise ValueError(f"best_of ({best_of}) must be at least n ({n})")
        if self.stream and best_of is not None and best_of > n:
            raise ValueError("best_of above n cannot be streamed (stream must be false)")
        if self.max_tokens == 0 and not self.echo:
            raise ValueError("max_tokens must be at least 1 (0 only with echo)")
        return self

    @property
    def prompts(self) -> list[str] | list[list[int]]:
        """The prompts as a list: strings, or token-id lists."""
        if isinstance(self.prompt, str):
            return [self.prompt]
        if self.prompt and isinstance(self.prompt[0], int):
            return [self.prompt]  # one prompt of token ids
        return self.prompt

    def logprob_params(self) -> dict[str, Any]:
        return {
            "top_logprobs": self.logprobs,
            "prompt_logprobs": self.echo,
            "prompt_only": self.echo and self.max_tokens == 0,
            "best_of": self.best_of or 0,
        }


def _token_ids(values: list) -> bool:
    return bool(values) and all(
        type(v) is int and 0 <= v <= INT32_MAX  # not bool, which is an int too
        for v in values
    )


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
    # Each generated token's log-probability, with top_logprobs (0-20) alternatives.
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_CHAT_TOP_LOGPROBS)] | None = None

    @model_validator(mode="after")
    def _top_logprobs_need_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs set to true")
        return self

    def logprob_params(self) -> dict[str, Any]:
        return {"top_logprobs": (self.top_logprobs or 0) if self.logprobs else None}
