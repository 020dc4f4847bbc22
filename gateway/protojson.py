"""Proto messages -> JSON for REST responses."""

from __future__ import annotations

from typing import Any

from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

_F = FieldDescriptor
_INT64 = {_F.TYPE_INT64, _F.TYPE_UINT64, _F.TYPE_SINT64, _F.TYPE_FIXED64, _F.TYPE_SFIXED64}


def proto_to_json(message: Message) -> dict[str, Any]:
    """The proto3 JSON mapping with the .proto's snake_case names and every field present,
    except that 64-bit integers (map values too) stay numbers (the mapping makes them strings for
    JavaScript's sake; byte counts and hit counters are far below 2**53)."""
    out = json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    _int64_to_numbers(message.DESCRIPTOR, out)
    return out


def _leave_as_is(descriptor: Descriptor) -> bool:
    """Well-known types (Timestamp, ...) have their own JSON forms."""
    return descriptor.full_name.startswith("google.protobuf.")


def _int64_to_numbers(descriptor: Descriptor, out: dict[str, Any]) -> None:
    for field in descriptor.fields:
        value = out.get(field.name)
        if value is None:
            continue
        repeated = isinstance(value, list)
        if field.type == _F.TYPE_MESSAGE and field.message_type.GetOptions().map_entry:
            if field.message_type.fields_by_name["value"].type in _INT64:
                out[field.name] = {k: int(v) for k, v in value.items()}
        elif field.type in _INT64:
            out[field.name] = [int(v) for v in value] if repeated else int(value)
        elif field.type == _F.TYPE_MESSAGE and not _leave_as_is(field.message_type):
            for item in value if repeated else [value]:
                _int64_to_numbers(field.message_type, item)
