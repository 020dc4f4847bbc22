"""Log-probabilities, echo, n, best_of and prompt lists through the official openai client
against the running local stack (the real tiny model and the demo adapters)."""

from __future__ import annotations

import openai
import pytest
from transformers import AutoTokenizer

from services.inference.settings import InferenceSettings

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

MODEL = "bank-support"
PROMPT = "Customer: I lost my card yesterday.\nAgent:"
OTHER = "Customer: How do I reset my PIN?\nAgent:"
CHAT = [{"role": "user", "content": "How do I reset my PIN?"}]


@pytest.fixture
def bank(stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.url}/v1", api_key=stack.keys["BANK_KEY"])


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(InferenceSettings().model_dir)


def test_completion_logprobs_shape_and_greedy_choice_is_the_most_likely(bank):
    reply = bank.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0, logprobs=3
    )
    choice = reply.choices[0]
    lp = choice.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == reply.usage.completion_tokens == 8
    assert "".join(lp.tokens) == choice.text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(8)]
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert logprob <= 0
        assert len(top) == 3  # greedy: the chosen token is one of the 3 most likely
        assert top[token] == logprob == max(top.values())


def test_streamed_completion_logprobs_add_up_to_the_whole(bank):
    ask = {"model": MODEL, "prompt": PROMPT, "max_tokens": 12, "temperature": 0, "logprobs": 1}
    whole = bank.completions.create(**ask).choices[0]
    chunks = [c for c in bank.completions.create(stream=True, **ask) if c.choices]
    pieces = [c.choices[0] for c in chunks if c.choices[0].logprobs is not None]
    assert len(pieces) > 1  # it came in pieces
    tokens = [t for p in pieces for t in p.logprobs.tokens]
    logprobs = [v for p in pieces for v in p.logprobs.token_logprobs]
    offsets = [o for p in pieces for o in p.logprobs.text_offset]
    assert tokens == whole.logprobs.tokens
    assert logprobs == pytest.approx(whole.logprobs.token_logprobs, abs=1e-6)
    assert offsets == whole.logprobs.text_offset
    assert "".join(p.text for p in pieces) == whole.text


def test_echo_with_max_tokens_zero_scores_the_prompt_like_generation_does(bank):
    """An evaluation harness's log-likelihood call: the prompt's log-probabilities, the
    first null; the continuation's equal what generating it reported."""
    generated = bank.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0, logprobs=0
    ).choices[0]
    scored = bank.completions.create(
        model=MODEL, prompt=PROMPT + generated.text, max_tokens=0, echo=True, logprobs=0
    )
    choice = scored.choices[0]
    assert choice.text == PROMPT + generated.text
    assert scored.usage.completion_tokens == 0
    lp = choice.logprobs
    assert len(lp.tokens) == scored.usage.prompt_tokens
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(v <= 0 for v in lp.token_logprobs[1:])
    assert lp.tokens[-6:] == generated.logprobs.tokens
    assert lp.token_logprobs[-6:] == pytest.approx(generated.logprobs.token_logprobs, abs=1e-4)


def test_echo_with_generation_returns_prompt_then_completion(bank):
    reply = bank.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0, echo=True, logprobs=1
    )
    choice = reply.choices[0]
    alone = bank.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0)
    assert choice.text == PROMPT + alone.choices[0].text
    assert len(choice.logprobs.tokens) == reply.usage.total_tokens


def test_streamed_echo_equals_the_whole(bank):
    ask = {"model": MODEL, "prompt": PROMPT, "temperature": 0, "echo": True, "logprobs": 2}
    for max_tokens in (0, 5):
        whole = bank.completions.create(max_tokens=max_tokens, **ask).choices[0]
        chunks = bank.completions.create(max_tokens=max_tokens, stream=True, **ask)
        pieces = [c.choices[0] for c in chunks if c.choices and c.choices[0].logprobs]
        assert pieces[0].text.startswith(PROMPT)
        assert "".join(p.text for p in pieces) == whole.text
        tokens = [t for p in pieces for t in p.logprobs.tokens]
        offsets = [o for p in pieces for o in p.logprobs.text_offset]
        assert tokens == whole.logprobs.tokens and offsets == whole.logprobs.text_offset
        logprobs = [v for p in pieces for v in p.logprobs.token_logprobs]
        assert logprobs[0] is None and whole.logprobs.token_logprobs[0] is None
        assert logprobs[1:] == pytest.approx(whole.logprobs.token_logprobs[1:], abs=1e-6)


def test_chat_logprobs_with_top_logprobs(bank):
    reply = bank.chat.completions.create(
        model=MODEL, messages=CHAT, max_tokens=8, temperature=0, logprobs=True, top_logprobs=4
    )
    choice = reply.choices[0]
    content = choice.logprobs.content
    assert len(content) == reply.usage.completion_tokens
    assert bytes(b for c in content for b in c.bytes).decode().startswith(choice.message.content)
    for entry in content:
        assert len(entry.top_logprobs) == 4
        assert entry.top_logprobs[0].token == entry.token  # greedy
        assert entry.top_logprobs[0].logprob == entry.logprob
        values = [t.logprob for t in entry.top_logprobs]
        assert values == sorted(values, reverse=True)
    plain = bank.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=8, temperature=0)
    assert plain.choices[0].logprobs is None
    assert plain.choices[0].message.content == choice.message.content


def test_streamed_chat_with_n_and_logprobs(bank):
    ask = {"model": MODEL, "messages": CHAT, "max_tokens": 10, "seed": 11, "n": 2}
    whole = bank.chat.completions.create(logprobs=True, **ask)
    chunks = list(bank.chat.completions.create(stream=True, logprobs=True, **ask))
    for index in (0, 1):
        mine = [c.choices[0] for c in chunks if c.choices and c.choices[0].index == index]
        assert mine[0].delta.role == "assistant"
        assert "".join(c.delta.content or "" for c in mine) == whole.choices[index].message.content
        assert mine[-1].finish_reason == whole.choices[index].finish_reason
        streamed = [e.logprob for c in mine if c.logprobs for e in c.logprobs.content]
        expected = [e.logprob for e in whole.choices[index].logprobs.content]
        assert streamed == pytest.approx(expected, abs=1e-6)


def test_n_choices_are_seeded_per_choice_and_reproducible(bank):
    ask = {"model": MODEL, "prompt": PROMPT, "max_tokens": 12, "temperature": 1.0, "seed": 7}
    three = bank.completions.create(n=3, logprobs=0, **ask)
    assert [c.index for c in three.choices] == [0, 1, 2]
    assert len({c.text for c in three.choices}) > 1  # different samples
    again = bank.completions.create(n=3, logprobs=0, **ask)
    assert [c.text for c in again.choices] == [c.text for c in three.choices]
    # Choice i samples with seed + i: each is what a one-choice request with that seed gives.
    for i, choice in enumerate(three.choices):
        alone = bank.completions.create(**ask | {"seed": 7 + i})
        assert alone.choices[0].text == choice.text
    generated = sum(len(c.logprobs.tokens) for c in three.choices)
    assert three.usage.completion_tokens == generated
    assert three.usage.prompt_tokens == bank.completions.create(**ask).usage.prompt_tokens


def test_best_of_returns_the_n_most_likely_of_its_samples(bank):
    ask = {"model": MODEL, "prompt": PROMPT, "max_tokens": 10, "temperature": 1.0, "seed": 3}
    every = bank.completions.create(n=5, logprobs=0, **ask)  # the same 5 samples (seeds 3-7)
    best = bank.completions.create(n=2, best_of=5, logprobs=0, **ask)
    ranked = sorted(every.choices, key=lambda c: sum(c.logprobs.token_logprobs), reverse=True)
    assert len({c.text for c in ranked[:2]} | {c.text for c in ranked[2:]}) > 1
    assert [c.text for c in best.choices] == [c.text for c in ranked[:2]]
    assert [c.logprobs.token_logprobs for c in best.choices] == [
        c.logprobs.token_logprobs for c in ranked[:2]
    ]
    assert [c.index for c in best.choices] == [0, 1]
    assert best.usage.completion_tokens == every.usage.completion_tokens  # all 5 generated


def test_prompt_lists_of_strings_and_token_ids(bank, tokenizer):
    ask = {"model": MODEL, "max_tokens": 8, "temperature": 0}
    both = bank.completions.create(prompt=[PROMPT, OTHER], n=2, **ask)
    assert [c.index for c in both.choices] == [0, 1, 2, 3]
    one = bank.completions.create(prompt=PROMPT, **ask).choices[0].text
    other = bank.completions.create(prompt=OTHER, **ask).choices[0].text
    assert [c.text for c in both.choices] == [one, one, other, other]
    ids = tokenizer(PROMPT).input_ids
    assert bank.completions.create(prompt=ids, **ask).choices[0].text == one
    listed = bank.completions.create(prompt=[ids, tokenizer(OTHER).input_ids], **ask)
    assert [c.text for c in listed.choices] == [one, other]
    assert listed.usage.prompt_tokens == len(ids) + len(tokenizer(OTHER).input_ids)


@pytest.mark.parametrize(
    ("call", "ask", "named"),
    [
        ("completions", {"n": 40}, "n is 40"),
        ("completions", {"n": 2, "best_of": 1}, "best_of"),
        ("completions", {"best_of": 3, "stream": True}, "best_of"),
        ("completions", {"logprobs": 6}, "logprobs"),
        ("completions", {"prompt": [[1, 2], [10**6]]}, "token id 1000000"),
        ("chat", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ("chat", {"top_logprobs": 2}, "top_logprobs"),
        ("chat", {"n": 33}, "n is 33"),
    ],
)
def test_bounds_are_400_naming_the_parameter(bank, call, ask, named):
    with pytest.raises(openai.BadRequestError) as raised:
        if call == "chat":
            bank.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=2, **ask)
        else:
            bank.completions.create(model=MODEL, max_tokens=2, **({"prompt": PROMPT} | ask))
    assert named in raised.value.message
