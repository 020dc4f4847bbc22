"""BatchExporter with a send of its own, and what the gateway's CandidateExporter turns a
completion into."""

from __future__ import annotations

import grpc
import pytest

from gateway.active_learning_exporter import CandidateExporter, candidate_from_reply, prompt_text
from loraplex.common.v1 import common_pb2
from loraplex.inference.v1 import inference_service_pb2 as ipb
from services.common.batch_exporter import BatchExporter
from services.common.channels import open_channel
from services.common.localhost import free_port


def rpc_error(code: grpc.StatusCode) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), "boom")


@pytest.fixture
async def channel():
    ch = open_channel(f"127.0.0.1:{free_port()}")  # never dialled: the sends are fakes
    yield ch
    await ch.close()


async def test_batches_are_retried_then_sent_and_bad_ones_dropped():
    sent: list[list[int]] = []
    batch_ids: list[str] = []
    failures = {"unavailable": 2}

    async def send(items, batch_id):
        batch_ids.append(batch_id)
        if failures["unavailable"]:
            failures["unavailable"] -= 1
            raise rpc_error(grpc.StatusCode.UNAVAILABLE)
        if -1 in items:
            raise rpc_error(grpc.StatusCode.INVALID_ARGUMENT)
        sent.append(list(items))
        return len(items), 0

    exporter = BatchExporter(send, name="test", max_batch=3, flush_interval_seconds=0.01)
    exporter.start()
    for i in range(5):
        exporter.record(i)
    await exporter.close()
    assert sent == [[0, 1, 2], [3, 4]] and exporter.dropped == 0
    # The first batch was tried three times under one id; the second got its own.
    assert batch_ids[0] == batch_ids[1] == batch_ids[2] != batch_ids[3]

    exporter = BatchExporter(send, name="test", flush_interval_seconds=0.01)
    exporter.start()
    exporter.record(-1)
    await exporter.close()
    assert exporter.dropped == 1  # INVALID_ARGUMENT is not retried


def reply(text: str = "Sure.", logprobs=(-0.1, -0.2)) -> ipb.GenerateResponse:
    return ipb.GenerateResponse(
        text=text,
        token_logprobs=logprobs,
        token_entropies=[0.5] * len(logprobs),
        adapter=common_pb2.AdapterRef(name="support", version=2),
    )


class Route:
    def __init__(self, in_experiment: bool) -> None:
        self.experiment, self.variant, self.unit = "tone", "warm", "user-9"
        self.in_experiment = in_experiment


def test_candidate_fields():
    c = candidate_from_reply("cmpl-1", "Hi", reply(), "base", "tone", "warm", "user-9")
    assert (c.id, c.prompt, c.output, c.adapter.name, c.adapter.version) == (
        "cmpl-1",
        "Hi",
        "Sure.",
        "support",
        2,
    )
    assert (c.experiment, c.variant, c.unit_id) == ("tone", "warm", "user-9")
    assert list(c.token_logprobs) == pytest.approx([-0.1, -0.2])
    base = ipb.GenerateResponse(text="x", token_logprobs=[-1.0], token_entropies=[1.0])
    assert candidate_from_reply("id", "p", base, "loraplex-tiny").adapter.name == "loraplex-tiny"
    chat = [
        ipb.ChatMessage(role="system", content="Be kind."),
        ipb.ChatMessage(role="user", content="Hi"),
    ]
    assert prompt_text("", chat) == "system: Be kind.\nuser: Hi"


async def test_completions_become_candidates_unless_there_is_nothing_to_score(channel):
    exporter = CandidateExporter(channel)
    request = ipb.GenerateRequest(request_id="cmpl-7", prompt="Q")
    exporter.completion("shop", request, reply(), Route(False), "base")
    exporter.completion("shop", request, reply(), Route(True), "base")
    exporter.completion("shop", request, reply(text="  "), Route(False), "base")
    exporter.completion("shop", request, reply(logprobs=()), Route(False), "base")
    queued = list(exporter._queue)
    assert [(t, c.id, c.experiment, c.unit_id) for t, c in queued] == [
        ("shop", "cmpl-7", "", ""),
        ("shop", "cmpl-7", "tone", "user-9"),
    ]
