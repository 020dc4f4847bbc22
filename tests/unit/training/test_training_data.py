"""Training data and parameters: formats, the held-out split, ranges."""

from __future__ import annotations

import json
import random

import pytest

from services.common.errors import InvalidArgument
from services.training.data import parse_jsonl, split
from services.training.params import Method, resolve_params
from services.training.settings import TrainingSettings


def jsonl(rows) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in rows)


SFT = [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(20)]


def test_split_is_deterministic_order_independent_and_disjoint():
    first = split(SFT, 0.2, seed=7, min_train=2, min_heldout=1)
    shuffled = SFT[:]
    random.Random(3).shuffle(shuffled)
    second = split(shuffled, 0.2, seed=7, min_train=2, min_heldout=1)
    assert first == second
    assert first.fingerprint == second.fingerprint
    assert len(first.heldout) == 4 and len(first.train) == 16
    assert not {json.dumps(r) for r in first.train} & {json.dumps(r) for r in first.heldout}
    assert split(SFT, 0.2, seed=8, min_train=2, min_heldout=1).heldout != first.heldout


def test_too_few_examples_for_a_heldout_split():
    with pytest.raises(InvalidArgument) as err:
        split(SFT[:2] + SFT[:2], 0.1, seed=0, min_train=2, min_heldout=1)  # 2 distinct rows
    assert err.value.reason == "TOO_FEW_EXAMPLES"


@pytest.mark.parametrize(
    ("data", "method", "reason"),
    [
        (b"", Method.SFT, "EMPTY_DATASET"),
        (b"\n\n", Method.SFT, "EMPTY_DATASET"),
        (b"{not json\n", Method.SFT, "BAD_DATASET"),
        (jsonl([{"prompt": "p", "completion": ""}]), Method.SFT, "BAD_DATASET"),
        (jsonl([{"text": "a"}, {"prompt": "p", "completion": "c"}]), Method.SFT, "BAD_DATASET"),
        (jsonl([{"prompt": "p", "completion": "c"}]), Method.DPO, "DPO_WITHOUT_PAIRS"),
        (jsonl([{"messages": [{"role": "robot", "content": "x"}]}]), Method.SFT, "BAD_DATASET"),
        (b"\xff\xfe", Method.SFT, "BAD_DATASET"),
    ],
)
def test_bad_datasets_are_refused_with_a_reason(data, method, reason):
    with pytest.raises(InvalidArgument) as err:
        parse_jsonl(data, method, max_examples=100)
    assert err.value.reason == reason


def test_trl_formats_are_accepted():
    assert len(parse_jsonl(jsonl(SFT), Method.SFT, 100)) == 20
    assert parse_jsonl(jsonl([{"text": "hello"}]), Method.SFT, 100) == [{"text": "hello"}]
    pairs = [{"prompt": "p", "chosen": "good", "rejected": "bad"}]
    assert parse_jsonl(jsonl(pairs), Method.DPO, 100) == pairs
    chat = [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    ]
    assert parse_jsonl(jsonl(chat), Method.SFT, 100) == chat


def test_params_defaults_and_ranges():
    settings = TrainingSettings(_env_file=None)
    p = resolve_params({}, settings)
    assert (p.rank, p.lora_alpha, p.target_modules) == (8, 16.0, ("q_proj", "v_proj"))
    assert resolve_params({"rank": 4}, settings).lora_alpha == 8.0
    for bad in (
        {"rank": 0},
        {"rank": 100_000},
        {"learning_rate": 0.0},
        {"learning_rate": float("nan")},
        {"heldout_fraction": 0.9},
        {"batch_size": 0},
        {"target_modules": ["q_proj", "../x"]},
    ):
        with pytest.raises(InvalidArgument) as err:
            resolve_params(bad, settings)
        assert err.value.reason == "PARAM_OUT_OF_RANGE"
