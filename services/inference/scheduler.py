"""Continuous batching across tenants, fair by S-LoRA's virtual token counter.

Requests wait in one queue per tenant. Between two decode steps the model thread admits
waiting requests into the running batch (up to max_batch_size rows and max_prefill_tokens
of prompt per step) and drops the finished ones, so a short request never waits for a long
one to end. The next request admitted comes from the tenant with the least service so far
(a counter charged per prompt token and, at twice the weight, per generated token); a
tenant that was idle joins at the smallest counter of the busy ones, so it gets neither a
backlog of credit nor a penalty. A full queue is refused at once (RESOURCE_EXHAUSTED), and
per tenant too, so one tenant's flood cannot take every slot.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import defaultdict, deque
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TypeVar

from services.common.errors import LoraplexError, ResourceExhausted, Unavailable
from services.inference.decoding import (
    DecodeBatch,
    DecodeSequence,
    Generation,
    ModelRunner,
    TokenLogprob,
    model_error,
)
from services.inference.settings import BatchingLimits

log = logging.getLogger(__name__)

T = TypeVar("T")
PROMPT_TOKEN_COST = 1.0
OUTPUT_TOKEN_COST = 2.0  # S-LoRA's weights: a decode step costs more than a prefill token


@dataclass(frozen=True)
class StreamChunk:
    """New text of a generation; `generation` is set on the last chunk. `index` is the
    sequence's row in its group; `logprobs` the token details whose text is now out."""

    text: str
    generation: Generation | None = None
    queue_seconds: float = 0.0
    index: int = 0
    logprobs: tuple[TokenLogprob, ...] = ()
    # Streaming with prompt scores (echo): on the sequence's first chunk.
    prompt_logprobs: tuple[TokenLogprob, ...] = ()
    prompt_text: str = ""


class ScheduledRequest:
    """A request's place in the scheduler; iterate it (async) for its chunks."""

    def __init__(
        self,
        tenant: str,
        sequence: DecodeSequence,
        scheduler: Scheduler,
        stream: bool = True,
        index: int = 0,
        chunks: asyncio.Queue | None = None,
    ) -> None:
        self.tenant = tenant
        self.sequence = sequence
        self.stream = stream  # False: only the final chunk (one wake-up of the event loop)
        self.index = index
        self._scheduler = scheduler
        self._loop = asyncio.get_running_loop()
        # A group's rows share one queue (RequestGroup reads it).
        self._chunks: asyncio.Queue[StreamChunk | BaseException] = (
            chunks if chunks is not None else asyncio.Queue()
        )
        self.submitted_at = time.perf_counter()
        self.admitted_at = 0.0
        self.cancelled = False
        self.done = False
        self._sent = 0  # characters of text already handed out
        self._sent_details = 0  # token details already handed out
        self._sent_prompt = False  # streaming: prompt scores handed out

    def __aiter__(self) -> AsyncIterator[StreamChunk]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[StreamChunk]:
        while True:
            item = await self._chunks.get()
            if isinstance(item, BaseException):
                raise item
            yield item
            if item.generation is not None:
                return

    def cancel(self) -> None:
        """The caller went away: stop at the next token boundary (no-op once done)."""
        if not self.done:
            self._scheduler._cancel(self)

    # -- called on the model thread -------------------------------------------------------

    def _publish(self) -> None:
        seq = self.sequence
        if seq.error is not None:
            self._fail(seq.error)
            return
        if not (self.stream or seq.finished):
            return
        end = seq.stable_text_length()
        prompt = self.stream and not self._sent_prompt and seq.prompt_details is not None
        if end <= self._sent and not seq.finished and not prompt:
            return
        text, self._sent = seq.text[self._sent : end], max(end, self._sent)
        details: tuple[TokenLogprob, ...] = ()
        if seq.details is not None and self.stream:
            upto = seq.details_through(end)
            details = tuple(seq.details[self._sent_details : upto])
            self._sent_details = max(upto, self._sent_details)
        scored: tuple[TokenLogprob, ...] = ()
        if prompt:
            scored, self._sent_prompt = tuple(seq.prompt_details), True
        generation, queued = None, 0.0
        if seq.finished:
            self.done = True
            generation, queued = seq.result(), self.admitted_at - self.submitted_at
        self._put(StreamChunk(text, generation, queued, self.index, details, scored))

    def _fail(self, err: BaseException) -> None:
        self.done = True
        self._put(err)

    def _put(self, item: StreamChunk | BaseException) -> None:
        # A closed event loop means nobody is listening any more.
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(self._chunks.put_nowait, item)


class RequestGroup:
    """Several sequences of one request, queued together so that they decode as rows of
    the same batch; iterate it (async) for every row's chunks, tagged with the row's
    index, up to the last row's final chunk. One row's error fails the group."""

    def __init__(self, requests: list[ScheduledRequest], chunks: asyncio.Queue) -> None:
        self.requests = requests
        self._chunks = chunks

    def __aiter__(self) -> AsyncIterator[StreamChunk]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[StreamChunk]:
        remaining = len(self.requests)
        while remaining:
            item = await self._chunks.get()
            if isinstance(item, BaseException):
                raise item
            yield item
            if item.generation is not None:
                remaining -= 1

    def cancel(self) -> None:
        for request in self.requests:
            request.cancel()


class Scheduler:
    def __init__(self, runner: ModelRunner, limits: BatchingLimits) -> None:
        self.runner = runner
        self.limits = limits
        self._cond = threading.Condition()
        self._waiting: dict[str, deque[ScheduledRequest]] = defaultdict(deque)
        self._queued = 0
        self._running_per_tenant: dict[str, int] = defaultdict(int)
        self._counters: dict[str, float] = defaultdict(float)
        self._calls: deque[tuple[Callable[[], object], Future]] = deque()
        self._cancelled: set[DecodeSequence] = set()
        self._batch = DecodeBatch(runner)
        self._running: list[ScheduledRequest] = []
        self._stopping = False
        self.steps = 0
        self._thread = threading.Thread(target=self._loop, name="model", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._thread.join(timeout=10)

    # -- event-loop side -------------------------------------------------------------------

    def submit(
        self, tenant: str, sequence: DecodeSequence, stream: bool = True
    ) -> ScheduledRequest:
        """Queue a sequence; iterate the result for its text (as decoded when `stream`, else
        all at once with the final chunk)."""
        request = ScheduledRequest(tenant, sequence, self, stream)
        self._enqueue(tenant, [request])
        return request

    def submit_group(
        self, tenant: str, sequences: list[DecodeSequence], stream: bool = True
    ) -> RequestGroup:
        """Queue several sequences of one request at once, all or none: they are admitted
        together (as far as the free rows and the prefill budget allow)."""
        chunks: asyncio.Queue = asyncio.Queue()
        requests = [
            ScheduledRequest(tenant, seq, self, stream, index, chunks)
            for index, seq in enumerate(sequences)
        ]
        self._enqueue(tenant, requests)
        return RequestGroup(requests, chunks)

    def _enqueue(self, tenant: str, requests: list[ScheduledRequest]) -> None:
        limits, count = self.limits, len(requests)
        with self._cond:
            if self._stopping:
                raise Unavailable("the inference server is shutting down", reason="SHUTTING_DOWN")
            if self._queued + count > limits.max_queued_requests:
                raise ResourceExhausted(
                    f"the inference queue is full ({limits.max_queued_requests} requests); "
                    "retry later",
                    reason="QUEUE_FULL",
                )
            if len(self._waiting[tenant]) + count > limits.max_queued_per_tenant:
                raise ResourceExhausted(
                    f"this tenant already has {limits.max_queued_per_tenant} requests queued; "
                    "retry later",
                    reason="TENANT_QUEUE_FULL",
                )
            if not self._waiting[tenant] and not self._running_per_tenant[tenant]:
                busy = [self._counters[t] for t in self._active_tenants() if t != tenant]
                if busy:  # join at the level of the busy tenants: no saved-up credit
                    self._counters[tenant] = max(self._counters[tenant], min(busy))
            self._waiting[tenant].extend(requests)
            self._queued += count
            self._cond.notify_all()

    def call(self, work: Callable[[], T]) -> Future[T]:
        """Run work on the model thread between two decode steps (e.g. scoring)."""
        future: Future[T] = Future()
        with self._cond:
            if self._stopping:
                raise Unavailable("the inference server is shutting down", reason="SHUTTING_DOWN")
            self._calls.append((work, future))
            self._cond.notify_all()
        return future

    def _cancel(self, request: ScheduledRequest) -> None:
        with self._cond:
            queue = self._waiting.get(request.tenant)
            if queue is not None and request in queue:
                queue.remove(request)
                self._queued -= 1
                request.done = True
            else:
                self._cancelled.add(request.sequence)
            request.cancelled = True

    def stats(self) -> dict[str, int]:
        with self._cond:
            return {"queued": self._queued, "running": len(self._running), "steps": self.steps}

    def _active_tenants(self) -> set[str]:
        queued = {t for t, q in self._waiting.items() if q}
        return queued | {t for t, n in self._running_per_tenant.items() if n}

    # -- model thread ----------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stopping:
            try:
                self._iterate()
            except Exception as err:  # the batch fails its own bad rows alone: this is a bug
                log.exception("decode loop failed")
                self._fail_running(err)
        self._shutdown()

    def _iterate(self) -> None:
        """Run queued calls, admit waiting requests, decode one token for every row."""
        with self._cond:
            while not (self._stopping or self._queued or self._calls or self._running):
                self._cond.wait()
            if self._stopping:
                return
            calls = list(self._calls)
            self._calls.clear()
            if not self._running and self._queued < self.limits.max_batch_size:
                # Idle: give concurrent arrivals a moment to share the first batch.
                self._cond.wait_for(
                    lambda: self._queued >= self.limits.max_batch_size or self._stopping,
                    timeout=self.limits.batch_wait_ms / 1000,
                )
            admitted = self._admit()
        for work, future in calls:
            self._run_call(work, future)
        if admitted:
            self._batch.add([r.sequence for r in admitted])
            self._emit()
        if self._running:
            self._batch.step()
            self.steps += 1
            with self._cond:
                for request in self._running:
                    self._counters[request.tenant] += OUTPUT_TOKEN_COST
            self._emit()

    def _admit(self) -> list[ScheduledRequest]:
        """Move waiting requests into the free rows, least-served tenant first (lock held).
        From here on they are running: whatever happens next, each of them is answered."""
        free = self.limits.max_batch_size - len(self._running)
        budget = self.limits.max_prefill_tokens
        admitted: list[ScheduledRequest] = []
        now = time.perf_counter()
        while free > 0 and self._queued:
            tenant = min((t for t, q in self._waiting.items() if q), key=self._counters.get)
            request = self._waiting[tenant][0]
            cost = len(request.sequence.prompt_ids)
            if admitted and cost > budget:
                break
            self._waiting[tenant].popleft()
            self._queued -= 1
            self._running_per_tenant[tenant] += 1
            self._running.append(request)
            self._counters[tenant] += cost * PROMPT_TOKEN_COST
            request.admitted_at = now
            admitted.append(request)
            free -= 1
            budget -= cost
        return admitted

    def _emit(self) -> None:
        """Hand out new text, then drop finished and cancelled rows."""
        with self._cond:
            cancelled, self._cancelled = self._cancelled, set()
        for request in self._running:
            if request.sequence not in cancelled:
                request._publish()
        self._batch.remove_finished(cancelled)
        # A row whose prefill failed never joined the batch; it is finished all the same.
        gone = [r for r in self._running if r.sequence.finished or r.sequence in cancelled]
        if gone:
            self._release(gone)

    def _release(self, requests: list[ScheduledRequest]) -> None:
        with self._cond:
            for request in requests:
                self._running_per_tenant[request.tenant] -= 1
                request.done = True
            ids = {id(r) for r in requests}
            self._running = [r for r in self._running if id(r) not in ids]

    def _fail_running(self, err: Exception) -> None:
        failure = err if isinstance(err, LoraplexError) else model_error()
        running = list(self._running)
        for request in running:
            request._fail(failure)
        self._batch = DecodeBatch(self.runner)
        self._release(running)

    @staticmethod
    def _run_call(work: Callable[[], object], future: Future) -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            future.set_result(work())
        except BaseException as err:
            future.set_exception(err)

    def _shutdown(self) -> None:
        gone = Unavailable("the inference server is shutting down", reason="SHUTTING_DOWN")
        with self._cond:
            waiting = [r for q in self._waiting.values() for r in q]
            self._waiting.clear()
            self._queued = 0
            calls = list(self._calls)
            self._calls.clear()
        for request in waiting + self._running:
            request._fail(gone)
        for _, future in calls:
            future.cancel()
