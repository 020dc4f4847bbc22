"""An event loop on a thread of its own, for library objects that offer blocking calls too.

redis.asyncio connections, asyncio tasks and locks belong to the loop that made them. The
product spec calls the libraries synchronously, also from inside `async def` code (whose
loop is then blocked for the call), so a library object keeps its async resources in a
loop of its own that is never the caller's: its coroutines run there, awaited from any
loop (`run`, `iterate`) or waited for from plain code (`call`).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


class LoopThread:
    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self._thread.start()

    def _here(self) -> bool:
        return threading.current_thread() is self._thread

    async def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Await coro, run in this loop."""
        if self._here():
            return await coro
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self.loop))

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run coro in this loop and wait for its result (blocking the calling thread)."""
        if self._here():
            coro.close()
            raise RuntimeError("a blocking call from inside its own loop would wait forever")
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    async def iterate(self, items: AsyncIterator[T]) -> AsyncIterator[T]:
        """Iterate an async iterator that runs in this loop, from the caller's loop."""
        if self._here():
            async for item in items:
                yield item
            return
        caller = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[bool, Any]] = asyncio.Queue()

        async def pump() -> None:
            try:
                async for item in items:
                    caller.call_soon_threadsafe(queue.put_nowait, (True, item))
            except asyncio.CancelledError:  # the caller stopped early
                raise
            except BaseException as err:  # handed to the caller, who raises it
                caller.call_soon_threadsafe(queue.put_nowait, (False, err))
            else:
                caller.call_soon_threadsafe(queue.put_nowait, (False, None))

        pumping = asyncio.run_coroutine_threadsafe(pump(), self.loop)
        try:
            while True:
                more, value = await queue.get()
                if not more:
                    if value is not None:
                        raise value
                    return
                yield value
        finally:
            pumping.cancel()  # the caller stopped early: stop the iterator too

    @property
    def stopped(self) -> bool:
        return self.loop.is_closed()

    def stop(self) -> None:
        """Stop the loop and its thread (after the object's own cleanup ran in it)."""
        if self.stopped:
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
        self.loop.close()
