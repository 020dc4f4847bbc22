"""Structured outputs and tool calls on /v1/chat/completions, in OpenAI's shapes.

`response_format` {"type": "json_object"} and {"type": "json_schema", ...} and the tool
choices that force a call ("required", or one named function) become a JSON Schema that the
inference service enforces while decoding (GenerateRequest.structured_output): the text
always parses and validates. Tool calls are that JSON, handed back as `message.tool_calls`.

tool_choice "auto" (OpenAI's default when tools are given) is refused: deciding between
answering and calling a tool needs a model trained to call tools, and the default model
is not; vLLM refuses it likewise unless a tool parser is configured. "none" answers in text.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from loraplex.inference.v1 import inference_service_pb2 as pb
from services.common.errors import InvalidArgument


class JsonSchemaFormat(BaseModel):
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    # Absent: any JSON object.
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    # Enforced whatever this says: the output always validates (OpenAI's strict mode).
    strict: bool | None = None


class ResponseFormat(BaseModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class FunctionDefinition(BaseModel):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[a-zA-Z0-9_-]+$")
    description: str | None = None
    # Absent: a function without parameters (its arguments are "{}").
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(BaseModel):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(BaseModel):
    name: str


class NamedToolChoice(BaseModel):
    type: Literal["function"]
    function: NamedFunction


class StructuredOutputFields(BaseModel):
    """The chat request's fields this module reads (mixed into ChatCompletionRequest)."""

    model_config = ConfigDict(populate_by_name=True)

    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = Field(default=None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None


_NO_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}


@dataclass
class StructuredPlan:
    """What one chat request asks for, and how its text becomes OpenAI's message."""

    schema: str | None = None  # JSON Schema text; "" any object; None: free text
    named: str | None = None  # tool_choice named this function: the text is its arguments
    required: bool = False  # tool_choice "required": the text is a list of calls
    # The choices whose named call has had its first delta (id, type, name) streamed.
    _opened: set[int] = field(default_factory=set)

    @property
    def calls_tools(self) -> bool:
        return self.named is not None or self.required

    def constrain(self, request: pb.GenerateRequest) -> None:
        if self.schema is not None:
            request.structured_output.CopyFrom(pb.StructuredOutput(json_schema=self.schema))

    def finish_reason(self, finish_reason: str) -> str:
        """A complete tool call ends with "tool_calls"; one cut by max_tokens, "length"."""
        return "tool_calls" if self.calls_tools and finish_reason == "stop" else finish_reason

    def message(self, text: str) -> dict[str, Any]:
        calls = self._calls(text)
        if calls is None:
            return {"role": "assistant", "content": text}
        return {"role": "assistant", "content": None, "tool_calls": calls}

    # -- streaming --------------------------------------------------------------------------

    def delta(self, index: int, text: str) -> dict[str, Any] | None:
        """The delta for choice `index`'s new text: content, a named call's arguments as
        they come, or nothing (a list of calls is sent whole when complete, by
        final_deltas)."""
        if self.named is not None:
            call: dict[str, Any] = {"index": 0, "function": {"arguments": text}}
            if index not in self._opened:
                self._opened.add(index)
                call |= {"id": _call_id(), "type": "function"}
                call["function"] = {"name": self.named, "arguments": text}
            return {"tool_calls": [call]}
        if self.required:
            return None
        return {"content": text}

    def final_deltas(self, text: str) -> list[dict[str, Any]]:
        if not self.required:
            return []
        calls = self._calls(text)
        if calls is None:  # cut short before it parsed: what there is, as text
            return [{"content": text}]
        return [{"tool_calls": [{"index": i} | c for i, c in enumerate(calls)]}]

    def _calls(self, text: str) -> list[dict[str, Any]] | None:
        if self.named is not None:
            return [self._call(self.named, text)]
        if not self.required:
            return None
        try:
            listed = json.loads(text)
        except json.JSONDecodeError:
            return None
        return [
            self._call(c["name"], json.dumps(c["arguments"], separators=(",", ":"))) for c in listed
        ]

    @staticmethod
    def _call(name: str, arguments: str) -> dict[str, Any]:
        return {
            "id": _call_id(),
            "type": "function",
            "function": {"name": name, "arguments": arguments},
        }


def _call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def plan(body: StructuredOutputFields) -> StructuredPlan:
    """What the request's response_format, tools and tool_choice ask for; refuses
    (INVALID_ARGUMENT) what cannot be honoured."""
    choice = body.tool_choice
    if choice is not None and not body.tools and choice != "none":
        raise InvalidArgument(
            "tool_choice needs `tools` to choose from", reason="TOOL_CHOICE_WITHOUT_TOOLS"
        )
    if body.tools:
        if choice is None or choice == "auto":
            raise InvalidArgument(
                'tool_choice "auto" (the default with tools) is not supported: the model '
                'cannot decide when to call a tool. Send tool_choice "required", a named '
                'function ({"type": "function", "function": {"name": ...}}) or "none"',
                reason="TOOL_CHOICE_UNSUPPORTED",
            )
        functions = {t.function.name: t.function for t in body.tools}
        if isinstance(choice, NamedToolChoice):
            function = functions.get(choice.function.name)
            if function is None:
                raise InvalidArgument(
                    f"tool_choice names {choice.function.name!r}, which is not in `tools`",
                    reason="UNKNOWN_TOOL",
                )
            return StructuredPlan(
                schema=_dump(function.parameters or _NO_PARAMETERS), named=function.name
            )
        if choice == "required":
            return StructuredPlan(
                schema=_dump(_calls_schema(list(functions.values()), body.parallel_tool_calls)),
                required=True,
            )
    response_format = body.response_format
    if response_format is None or response_format.type == "text":
        return StructuredPlan()
    if response_format.type == "json_object":
        return StructuredPlan(schema="")
    json_schema = response_format.json_schema
    if json_schema is None:
        raise InvalidArgument(
            'response_format of type "json_schema" needs its `json_schema` object',
            reason="INVALID_SCHEMA",
        )
    return StructuredPlan(schema="" if json_schema.schema_ is None else _dump(json_schema.schema_))


def _calls_schema(functions: list[FunctionDefinition], parallel: bool | None) -> dict[str, Any]:
    """A list of one call or more (one only when parallel_tool_calls is false), each a
    function's name and arguments that validate against its parameters."""
    call = {
        "anyOf": [
            {
                "type": "object",
                "properties": {
                    "name": {"const": f.name},
                    "arguments": f.parameters or _NO_PARAMETERS,
                },
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
            for f in functions
        ]
    }
    schema: dict[str, Any] = {"type": "array", "items": call, "minItems": 1}
    if parallel is False:
        schema["maxItems"] = 1
    return schema


def _dump(schema: dict[str, Any]) -> str:
    return json.dumps(schema, separators=(",", ":"))
