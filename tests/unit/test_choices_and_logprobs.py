"""The pure parts of log-probabilities and several choices: top-k per row, best_of's
pick, per-choice seeds, and OpenAI's two logprobs shapes."""

from __future__ import annotations

import math

import pytest
import torch

from gateway.openai_routes import _chat_logprobs, _completion_logprobs
from loraplex.inference.v1 import inference_service_pb2 as pb
from services.inference.core import SamplingRequest, _result, _seeded
from services.inference.decoding import Generation, SamplingConfig, _top_logprobs
from services.inference.scheduler import StreamChunk


def test_top_logprobs_per_row_most_likely_first():
    logp = torch.log(torch.tensor([[0.1, 0.6, 0.3], [0.5, 0.2, 0.3]]))
    rows = _top_logprobs(logp, [2, None])
    assert [t for t, _ in rows[0]] == [1, 2]
    assert [v for _, v in rows[0]] == pytest.approx([math.log(0.6), math.log(0.3)])
    assert rows[1] == ()
    assert _top_logprobs(logp, [None, 0]) == [(), ()]


def generation(logprobs: list[float], text: str) -> Generation:
    return Generation(text, "length", 3, len(logprobs), token_logprobs=logprobs)


def test_best_of_keeps_the_n_highest_cumulative_logprobs_per_prompt_best_first():
    # Two prompts, best_of 3, n 2. The highest mean is not the highest sum: the sum wins.
    rows = [
        generation([-1.0, -1.0], "a"),  # -2.0
        generation([-0.1], "b"),  # -0.1
        generation([-0.5, -0.5, -0.5], "c"),  # -1.5 (mean -0.5)
        generation([-3.0], "d"),
        generation([-0.2, -0.2], "e"),
        generation([-9.0], "f"),
    ]
    finals = [StreamChunk(g.text, g, 0.0, i) for i, g in enumerate(rows)]
    params = SamplingRequest(max_new_tokens=4, n=2, best_of=3)
    result = _result(finals, ["", ""], [[1, 2, 3], [4, 5]], params, None)
    assert [(c.index, c.prompt_index, c.generation.text) for c in result.choices] == [
        (0, 0, "b"),
        (1, 0, "c"),
        (2, 1, "e"),
        (3, 1, "d"),
    ]
    assert result.prompt_tokens == 5  # once per prompt
    assert result.completion_tokens == 10  # every generated token, discarded ones too


def test_without_best_of_choices_keep_seed_order():
    rows = [generation([-5.0], "first"), generation([-0.1], "second")]
    finals = [StreamChunk(g.text, g, 0.0, i) for i, g in enumerate(rows)]
    result = _result(finals, [""], [[7, 8]], SamplingRequest(4, n=2), None)
    assert [c.generation.text for c in result.choices] == ["first", "second"]


def test_choice_i_samples_with_seed_plus_i():
    config = SamplingConfig(4, seed=2**64 - 1)
    assert _seeded(config, 0).seed == 2**64 - 1
    assert _seeded(config, 2).seed == 1  # wraps within uint64
    assert _seeded(SamplingConfig(4), 3).seed is None


def entry(token: str, logprob: float | None, *top: tuple[str, float]) -> pb.TokenLogprob:
    made = pb.TokenLogprob(token=token, token_bytes=token.encode(), logprob=logprob)
    made.top_logprobs.extend(
        pb.TokenLogprob(token=t, token_bytes=t.encode(), logprob=v) for t, v in top
    )
    return made


def test_completion_logprobs_shape():
    entries = [
        entry("<s>", None),
        entry("Hi", -1.5, ("Hello", -0.5)),
        entry(" there", -0.25, (" there", -0.25)),
    ]
    got = _completion_logprobs(entries)
    assert got == {
        "tokens": ["<s>", "Hi", " there"],
        "token_logprobs": [None, -1.5, -0.25],
        # The asked-for alternatives and the chosen token (logprobs + 1 at most).
        "top_logprobs": [None, {"Hello": -0.5, "Hi": -1.5}, {" there": -0.25}],
        "text_offset": [0, 3, 5],
    }
    assert _completion_logprobs(entries[1:], text_start=10)["text_offset"] == [10, 12]


def test_chat_logprobs_shape():
    got = _chat_logprobs([entry("é", -0.5, ("é", -0.5), ("e", -1.0))])
    assert got == {
        "content": [
            {
                "token": "é",
                "logprob": -0.5,
                "bytes": [195, 169],
                "top_logprobs": [
                    {"token": "é", "logprob": -0.5, "bytes": [195, 169]},
                    {"token": "e", "logprob": -1.0, "bytes": [101]},
                ],
            }
        ],
        "refusal": None,
    }
