"""A lean, pipelined Redis connection for one Lua script: the Assign hot path.

redis-py's asyncio client costs ~0.1-0.2 ms of CPU per command in this service (command
packing, a connection checkout, a `wait_for` per send, a general RESP parser), more than the
hashing and the Redis work together. `ScriptPipe` keeps one dedicated connection: calls made
in the same event-loop turn go out in one write, replies are matched in order by a small
parser of the reply types a script returns. It speaks plain RESP (EVALSHA, falling back to
EVAL once after NOSCRIPT, e.g. after a Redis restart), so any Redis-compatible server works.

Only TCP and unix-socket connections with optional password/db are supported; anything else
(TLS, credential providers, clusters) keeps using redis-py (`ScriptPipe.supports`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import socket
import threading
from collections import deque
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.connection import Connection, UnixDomainSocketConnection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

_HANDLED = {"host", "port", "path", "db", "username", "password"}
# Connection options that change nothing on the wire for us.
_IGNORED = {
    "himport_registry",
    "maint_notifications_pool_handler",
    "maint_notifications_config",
    "orig_host_address",
    "orig_socket_timeout",
    "orig_socket_connect_timeout",
    "socket_timeout",
    "socket_connect_timeout",
    "socket_keepalive",
    "socket_keepalive_options",
    "retry_on_timeout",
    "retry_on_error",
    "retry",
    "health_check_interval",
    "client_name",
    "lib_name",
    "lib_version",
    "encoding",
    "encoding_errors",
    "decode_responses",
    "protocol",
    "redis_connect_func",
}


class _Incomplete(Exception):
    pass


def _parse(buf: bytes, pos: int) -> tuple[Any, int]:
    """One RESP value at buf[pos:]; raises _Incomplete when more bytes are needed."""
    end = buf.find(b"\r\n", pos)
    if end < 0:
        raise _Incomplete
    kind = buf[pos]
    line = buf[pos + 1 : end]
    pos = end + 2
    if kind == 58:  # ':' integer
        return int(line), pos
    if kind == 42 or kind == 126:  # '*' array, '~' set (RESP3)
        n = int(line)
        if n < 0:
            return None, pos
        items = []
        for _ in range(n):
            item, pos = _parse(buf, pos)
            items.append(item)
        return items, pos
    if kind == 36:  # '$' bulk string
        n = int(line)
        if n < 0:
            return None, pos
        if len(buf) < pos + n + 2:
            raise _Incomplete
        return buf[pos : pos + n], pos + n + 2
    if kind == 43:  # '+' simple string
        return line, pos
    if kind == 45:  # '-' error
        return ResponseError(line.decode(errors="replace")), pos
    if kind == 95:  # '_' null (RESP3)
        return None, pos
    raise RedisConnectionError(f"unexpected reply type {chr(kind)!r} from redis")


def _command(*parts: bytes) -> bytes:
    out = [b"*%d\r\n" % len(parts)]
    for part in parts:
        out.append(b"$%d\r\n%s\r\n" % (len(part), part))
    return b"".join(out)


class _Protocol(asyncio.Protocol):
    def __init__(self, pipe: ScriptPipe) -> None:
        self.pipe = pipe

    def data_received(self, data: bytes) -> None:
        self.pipe._received(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.pipe._lost(exc)


class ScriptPipe:
    def __init__(self, redis: aioredis.Redis, script: str) -> None:
        self.options = dict(redis.connection_pool.connection_kwargs)
        self.script = script.encode()
        self.sha = hashlib.sha1(self.script).hexdigest().encode()
        # (future, script arguments; () once retried; None: a plain command), as sent
        self.pending: deque[tuple[asyncio.Future, tuple[bytes, ...] | None]] = deque()
        self.out: list[bytes] = []
        self.buf = b""
        self.transport: asyncio.Transport | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.lock: asyncio.Lock | None = None

    @staticmethod
    def supports(redis: aioredis.Redis) -> bool:
        pool = getattr(redis, "connection_pool", None)
        if pool is None or pool.connection_class not in (Connection, UnixDomainSocketConnection):
            return False
        return set(pool.connection_kwargs) <= _HANDLED | _IGNORED

    async def call(self, numkeys: int, *parts: bytes | str | int) -> Any:
        """EVALSHA of the script with `numkeys` keys first in `parts`."""
        if self.transport is None or self.loop is not asyncio.get_running_loop():
            await self._connect()
        args = (str(numkeys).encode(), *(_encode(p) for p in parts))
        return await self._send(_command(b"EVALSHA", self.sha, *args), args)

    def _send(self, command: bytes, args: tuple[bytes, ...] | None) -> asyncio.Future:
        future = self.loop.create_future()  # type: ignore[union-attr]
        self.pending.append((future, args))
        if not self.out:
            self.loop.call_soon(self._flush)  # type: ignore[union-attr]
        self.out.append(command)
        return future

    def _flush(self) -> None:
        if not self.out:
            return
        data = b"".join(self.out)
        self.out.clear()
        if self.transport is None:
            self._fail(RedisConnectionError("redis connection lost"))
            return
        self.transport.write(data)

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        if self.loop is not loop:  # first use, or a new event loop (tests)
            self._drop(RedisConnectionError("event loop changed"))
            self.loop, self.lock = loop, asyncio.Lock()
        async with self.lock:  # type: ignore[union-attr]
            if self.transport is not None:
                return
            opts = self.options
            try:
                if opts.get("path"):
                    transport, _ = await loop.create_unix_connection(
                        lambda: _Protocol(self), opts["path"]
                    )
                else:
                    host, port = opts.get("host", "localhost"), opts.get("port", 6379)
                    transport, _ = await loop.create_connection(lambda: _Protocol(self), host, port)
            except OSError as err:
                raise RedisConnectionError(f"cannot connect to redis: {err}") from err
            self.transport = transport  # type: ignore[assignment]
            self.buf = b""
            hello = []
            if opts.get("password"):
                user = opts.get("username")
                auth = (user, opts["password"]) if user else (opts["password"],)
                hello.append(_command(b"AUTH", *(_encode(a) for a in auth)))
            if opts.get("db"):
                hello.append(_command(b"SELECT", _encode(opts["db"])))
            for command in hello:
                reply = await self._send(command, None)
                if isinstance(reply, Exception):
                    raise reply

    def _received(self, data: bytes) -> None:
        buf = self.buf + data if self.buf else data
        pos = 0
        try:
            while pos < len(buf):
                reply, pos = _parse(buf, pos)
                future, args = self.pending.popleft()
                if isinstance(reply, ResponseError) and args is not None:
                    if args and str(reply).startswith("NOSCRIPT"):  # not loaded (any more)
                        self.pending.append((future, ()))  # () : no second retry
                        if not self.out:
                            self.loop.call_soon(self._flush)  # type: ignore[union-attr]
                        self.out.append(_command(b"EVAL", self.script, *args))
                    elif not future.done():
                        future.set_exception(reply)
                    continue
                if not future.done():
                    future.set_result(reply)  # plain commands get errors as values
        except _Incomplete:
            pass
        except Exception as err:  # a reply we cannot parse: the stream is unusable
            self._drop(RedisConnectionError(f"bad reply from redis: {err}"))
            return
        self.buf = buf[pos:]

    def _fail(self, err: Exception) -> None:
        while self.pending:
            future, _ = self.pending.popleft()
            if not future.done():
                future.set_exception(err)

    def _lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.out.clear()
        self._fail(RedisConnectionError(f"redis connection lost: {exc or 'closed'}"))

    def _drop(self, err: Exception) -> None:
        transport, self.transport = self.transport, None
        self.out.clear()
        self._fail(err)
        if transport is not None:
            with contextlib.suppress(RuntimeError):  # its event loop is already closed
                transport.close()

    def close(self) -> None:
        self._drop(RedisConnectionError("closed"))


def _encode(value: bytes | str | int | float) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode()
    return str(value).encode()


class SyncScriptConnection:
    """ScriptPipe's blocking twin for a thread-pool server: one connection per thread,
    one round trip per call (EVALSHA, EVAL after NOSCRIPT)."""

    def __init__(self, redis: aioredis.Redis, script: str) -> None:
        self.options = dict(redis.connection_pool.connection_kwargs)
        self.script = script.encode()
        self.sha = hashlib.sha1(self.script).hexdigest().encode()
        self.local = threading.local()
        self.sockets: set[socket.socket] = set()  # every thread's, for close()
        self.lock = threading.Lock()

    def _socket(self) -> socket.socket:
        sock = getattr(self.local, "sock", None)
        if sock is not None:
            return sock
        opts = self.options
        try:
            if opts.get("path"):
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.connect(opts["path"])
            else:
                host, port = opts.get("host", "localhost"), opts.get("port", 6379)
                sock = socket.create_connection((host, port), timeout=30)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock.settimeout(None)
        except OSError as err:
            raise RedisConnectionError(f"cannot connect to redis: {err}") from err
        self.local.sock = sock
        with self.lock:
            self.sockets.add(sock)
        if opts.get("password"):
            user = opts.get("username")
            auth = (user, opts["password"]) if user else (opts["password"],)
            self._round_trip(_command(b"AUTH", *(_encode(a) for a in auth)), check=True)
        if opts.get("db"):
            self._round_trip(_command(b"SELECT", _encode(opts["db"])), check=True)
        return sock

    def _round_trip(self, command: bytes, check: bool = False) -> Any:
        sock = self._socket()
        try:
            sock.sendall(command)
            buf = b""
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    raise OSError("connection closed by redis")
                buf += chunk
                try:
                    reply, _ = _parse(buf, 0)
                    break
                except _Incomplete:
                    continue
        except OSError as err:
            self.local.sock = None
            with self.lock:
                self.sockets.discard(sock)
            with contextlib.suppress(OSError):
                sock.close()
            raise RedisConnectionError(f"redis connection lost: {err}") from err
        if check and isinstance(reply, Exception):
            raise reply
        return reply

    def call(self, numkeys: int, *parts: bytes | str | int) -> Any:
        args = (str(numkeys).encode(), *(_encode(p) for p in parts))
        reply = self._round_trip(_command(b"EVALSHA", self.sha, *args))
        if isinstance(reply, ResponseError) and str(reply).startswith("NOSCRIPT"):
            reply = self._round_trip(_command(b"EVAL", self.script, *args))
        if isinstance(reply, ResponseError):
            raise reply
        return reply

    def close(self) -> None:
        with self.lock:
            sockets, self.sockets = self.sockets, set()
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.close()
        self.local = threading.local()
