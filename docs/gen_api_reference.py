"""Writes docs/api-reference.md from the comments in protos/ (`make docs`).

protoc parses the protos (with their comments: --include_source_info) into descriptors,
and this renders them: nothing in the reference is written by hand, and
tests/deploy/test_docs.py fails when the committed file differs from a fresh render.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

from google.protobuf import descriptor_pb2

ROOT = Path(__file__).resolve().parents[1]
PROTOS = ROOT / "protos"
OUT = ROOT / "docs" / "api-reference.md"

# FieldDescriptorProto numbers in SourceCodeInfo paths.
MESSAGE, SERVICE, ENUM = 4, 6, 5
FIELD, NESTED, NESTED_ENUM, METHOD, VALUE = 2, 3, 4, 2, 2
TYPES = {
    v: k.removeprefix("TYPE_").lower() for k, v in descriptor_pb2.FieldDescriptorProto.Type.items()
}


def descriptors() -> descriptor_pb2.FileDescriptorSet:
    files = sorted(str(p.relative_to(PROTOS)) for p in PROTOS.rglob("*.proto"))
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "set.pb"
        subprocess.run(
            [sys.executable, "-m", "grpc_tools.protoc", f"-I{PROTOS}", "--include_source_info",
             f"--descriptor_set_out={out}", *files],
            check=True,
        )  # fmt: skip
        return descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())


def comment(comments: dict, path: tuple[int, ...]) -> str:
    loc = comments.get(path)
    if loc is None:
        return ""
    text = loc.leading_comments or loc.trailing_comments
    return " ".join(line.strip() for line in text.strip().splitlines())


def cell(text: str) -> str:
    return text.replace("|", "\\|")


def field_type(f: descriptor_pb2.FieldDescriptorProto) -> str:
    name = f.type_name.lstrip(".") if f.type_name else TYPES[f.type]
    if f.label == f.LABEL_REPEATED:
        return f"repeated {name}"
    if f.proto3_optional:
        return f"optional {name}"
    return name


def render_message(lines, comments, msg, path, prefix) -> None:
    full = f"{prefix}.{msg.name}"
    if msg.options.map_entry:
        return
    lines += [f"#### `{full}`", ""]
    if doc := comment(comments, path):
        lines += [doc, ""]
    if msg.field:
        lines += ["| field | type | description |", "|---|---|---|"]
        for i, f in enumerate(msg.field):
            doc = cell(comment(comments, (*path, FIELD, i)))
            lines.append(f"| `{f.name}` | `{field_type(f)}` | {doc} |")
        lines.append("")
    for i, nested in enumerate(msg.nested_type):
        render_message(lines, comments, nested, (*path, NESTED, i), full)
    for i, enum in enumerate(msg.enum_type):
        render_enum(lines, comments, enum, (*path, NESTED_ENUM, i), full)


def render_enum(lines, comments, enum, path, prefix) -> None:
    lines += [f"#### enum `{prefix}.{enum.name}`", ""]
    if doc := comment(comments, path):
        lines += [doc, ""]
    lines += ["| value | number | description |", "|---|---|---|"]
    for i, v in enumerate(enum.value):
        lines.append(f"| `{v.name}` | {v.number} | {cell(comment(comments, (*path, VALUE, i)))} |")
    lines.append("")


def render(fds: descriptor_pb2.FileDescriptorSet) -> str:
    lines = [
        "# gRPC API reference",
        "",
        "Generated from the comments in `protos/` by `docs/gen_api_reference.py` (`make docs`);",
        "do not edit by hand. The HTTP API of the gateway is in [api.md](api.md).",
        "",
    ]
    for f in sorted(fds.file, key=lambda f: f.name):
        if not f.name.startswith("loraplex/"):
            continue
        comments = {tuple(loc.path): loc for loc in f.source_code_info.location}
        lines += [f"## `{f.package}`", "", f"Source: `protos/{f.name}`", ""]
        for si, service in enumerate(f.service):
            lines += [f"### service `{f.package}.{service.name}`", ""]
            if doc := comment(comments, (SERVICE, si)):
                lines += [doc, ""]
            lines += ["| RPC | request | response | description |", "|---|---|---|---|"]
            for mi, m in enumerate(service.method):
                response = ("stream " if m.server_streaming else "") + m.output_type.lstrip(".")
                doc = cell(comment(comments, (SERVICE, si, METHOD, mi)))
                lines.append(
                    f"| `{m.name}` | `{m.input_type.lstrip('.')}` | `{response}` | {doc} |"
                )
            lines.append("")
        if f.message_type or f.enum_type:
            lines += ["### Messages", ""]
        for i, msg in enumerate(f.message_type):
            render_message(lines, comments, msg, (MESSAGE, i), f.package)
        for i, enum in enumerate(f.enum_type):
            render_enum(lines, comments, enum, (ENUM, i), f.package)
    return "\n".join(lines).rstrip() + "\n"


def main() -> int:
    OUT.write_text(render(descriptors()))
    print(f"wrote {OUT.relative_to(ROOT)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
