"""The Lua scripts analytics runs inside Redis, kept as files in lua/ (package data)."""

from __future__ import annotations

from importlib import resources


def lua(name: str) -> str:
    """The source of lua/<name>.lua; every value it needs comes as KEYS or ARGV."""
    return resources.files(__package__).joinpath("lua", f"{name}.lua").read_text("utf-8")
