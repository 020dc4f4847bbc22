"""A guard that every Redis command the code sends stays in one hash slot.

Redis Cluster refuses a multi-key command or a script whose declared KEYS span slots
(CROSSSLOT), but it lets a script touch an undeclared key of another slot when that slot
happens to live on the same node -- which depends on how slots fall on the nodes. So the
guard looks at every command as it is packed for the wire (scripts included, with their
ARGV, where key prefixes are passed): all arguments shaped like one of our keys
(`lp:{tag}:...`, services/common/keys.py) must share one hash tag, and a script given
such a key must declare at least one key (a cluster routes a script by its first KEYS).
Pub/sub channels are named the same way but belong to no slot (a cluster hands every
PUBLISH, from a script too, to every node), so they do not count. It records, rather
than raises, so a violation deep inside a service shows up in the test that caused it.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager

from redis.asyncio.connection import AbstractConnection

from services.experiments.keys import DEFINITIONS_CHANNEL
from services.inference.registry import SWAP_CHANNEL

_KEY = re.compile(rb"lp:\{([^}]*)\}:")
CHANNELS = {DEFINITIONS_CHANNEL.encode(), SWAP_CHANNEL.encode()}


def hash_tags(args: tuple) -> set[bytes]:
    """The hash tags of the arguments that are our key names or key prefixes."""
    tags = set()
    for arg in args:
        raw = arg.encode() if isinstance(arg, str) else arg
        if isinstance(raw, bytes) and raw not in CHANNELS:
            match = _KEY.match(raw)
            if match:
                tags.add(match[1])
    return tags


def undeclared_script(args: tuple) -> bool:
    """A script call that touches our keys but declares none: a cluster client sends it to
    a random node, where those keys are not (it fails, or reads nothing)."""
    name = args[0].decode() if isinstance(args[0], bytes) else str(args[0])
    return name.upper() in ("EVAL", "EVALSHA") and int(args[2]) == 0 and bool(hash_tags(args))


@contextmanager
def cross_slot_commands() -> Iterator[list[tuple]]:
    """While inside: every packed command whose key arguments name more than one hash
    tag, or a script call that declares none of the keys it is given, is appended to the
    yielded list."""
    seen: list[tuple] = []
    original = AbstractConnection.pack_command

    def pack_command(self, *args):
        if len(hash_tags(args)) > 1 or undeclared_script(args):
            seen.append(args)
        return original(self, *args)

    AbstractConnection.pack_command = pack_command
    try:
        yield seen
    finally:
        AbstractConnection.pack_command = original
