"""The library API as the product spec shows it: from services import ..."""

from __future__ import annotations

import math

import numpy as np
import pytest

from services import ActiveLearningSelector, UncertaintyMethod, select_for_feedback
from services.activelearning.scores import TOKEN_METHODS
from services.common.errors import InvalidArgument


def output(i: int, entropy: float, logprob: float = -0.5) -> dict:
    return {
        "id": f"o{i}",
        "prompt": f"Customer question number {i} about topic {i * 7}",
        "output": f"Agent answer {i} with details {i * 13}",
        "token_logprobs": [logprob, logprob],
        "token_entropies": [entropy, entropy],
    }


OUTPUTS = [output(i, e) for i, e in enumerate([0.2, 1.5, 0.9, 2.4, 0.1, 1.1])]


def test_select_for_feedback_picks_the_most_uncertain_first():
    batch = select_for_feedback(model_outputs=OUTPUTS, method="entropy", batch_size=3)
    assert [e.id for e in batch] == ["o3", "o1", "o5"]
    assert [e.priority for e in batch] == [1, 2, 3]
    assert batch[0].score == pytest.approx(2.4)
    assert batch[0].model_output == OUTPUTS[3]["output"]
    assert batch.method is UncertaintyMethod.ENTROPY


def test_batch_larger_than_the_candidates_returns_all_of_them_ranked():
    batch = select_for_feedback(model_outputs=OUTPUTS, method="entropy", batch_size=7)
    assert [e.id for e in batch] == ["o3", "o1", "o5", "o2", "o0", "o4"]


def test_selector_with_logits_as_in_the_spec():
    rng = np.random.default_rng(0)
    sharp = np.array([[8.0, 0.0, 0.0, 0.0]] * 3)  # confident
    flat = rng.normal(0, 0.01, (3, 4))  # nearly uniform
    candidates = [{"prompt": "a", "output": "x"}, {"prompt": "b", "output": "y"}]
    for method in TOKEN_METHODS:
        picked = ActiveLearningSelector(method=method).select_uncertain_examples(
            candidates=candidates, logits=[sharp, flat]
        )
        assert [e.prompt for e in picked] == ["b", "a"], method
    margin = ActiveLearningSelector(method="margin").select_uncertain_examples(
        candidates, logits=[sharp, flat]
    )
    p = np.exp(8) / (np.exp(8) + 3)
    assert margin[1].score == pytest.approx(1 - (p - (1 - p) / 3))


def test_a_bad_candidate_is_reported_and_the_good_ones_still_selected():
    bad_nan = {"output": "nan logits"}
    empty = {"output": "", "token_logprobs": [-0.1], "token_entropies": [0.3]}
    mismatched = {"output": "z", "token_logprobs": [-0.1, -0.2], "token_entropies": [0.3]}
    no_stats = {"output": "no numbers"}
    candidates = [OUTPUTS[0], bad_nan, empty, mismatched, OUTPUTS[3], no_stats]
    logits = [None, np.array([[np.nan, 1.0]]), None, None, None, None]
    batch = ActiveLearningSelector().select_uncertain_examples(candidates, logits=logits)
    assert [e.index for e in batch] == [4, 0]
    assert [(r.index, r.reason) for r in batch.rejected] == [
        (1, "NOT_FINITE"),
        (2, "EMPTY_OUTPUT"),
        (3, "LENGTH_MISMATCH"),
        (5, "MISSING_TOKEN_STATS"),
    ]


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [
        ({"method": "vibes"}, "UNKNOWN_METHOD"),
        ({"batch_size": 0}, "INVALID_BATCH_SIZE"),
        ({"batch_size": -1}, "INVALID_BATCH_SIZE"),
        ({"strategy": "best"}, "UNKNOWN_STRATEGY"),
    ],
)
def test_call_errors(kwargs, reason):
    with pytest.raises(InvalidArgument) as err:
        select_for_feedback(OUTPUTS, **kwargs)
    assert err.value.reason == reason


def test_logits_for_a_different_number_of_candidates():
    with pytest.raises(InvalidArgument) as err:
        ActiveLearningSelector().select_uncertain_examples(OUTPUTS, logits=[np.zeros((1, 3))])
    assert err.value.reason == "LENGTH_MISMATCH"


def test_no_valid_candidate_at_all():
    with pytest.raises(InvalidArgument) as err:
        select_for_feedback([{"output": ""}], batch_size=1)
    assert err.value.reason == "NO_VALID_CANDIDATES"


def test_without_batch_size_every_valid_candidate_is_ranked():
    ranked = ActiveLearningSelector(method=UncertaintyMethod.NLL).select_uncertain_examples(
        [output(0, 1.0, -0.1), output(1, 1.0, -2.0), output(2, 1.0, -0.7)]
    )
    assert [e.index for e in ranked] == [1, 2, 0]
    assert ranked[0].scores.least_confidence == pytest.approx(-math.expm1(-4.0))


def test_hybrid_keeps_near_copies_out_of_one_batch():
    copies = [
        {**output(i, 2.0 + 0.01 * i), "prompt": "Where is my order?", "output": "Checking."}
        for i in range(5)
    ]
    batch = select_for_feedback(copies + OUTPUTS, batch_size=3, strategy="hybrid")
    assert sum(e.prompt == "Where is my order?" for e in batch) == 1
    assert batch.near_duplicates == 0  # hybrid spread them out before de-duplication


def test_sampling_methods_rank_by_how_much_the_samples_disagree():
    agree = output(0, 2.0) | {"samples": ["It ships Monday."] * 3}
    split = output(1, 0.1) | {"samples": ["It ships Monday.", "It ships Monday.", "No idea."]}
    scattered = output(2, 0.5) | {"samples": ["Monday.", "Refunds take days.", "Call us."]}
    unsampled = output(3, 3.0)
    batch = select_for_feedback(
        [agree, split, scattered, unsampled], method="sample_clusters", batch_size=3
    )
    assert [e.id for e in batch] == ["o2", "o1", "o0"]  # 3, 2 and 1 distinct answers
    assert [e.score for e in batch] == [3, 2, 1]
    assert batch[0].scores.entropy == pytest.approx(0.5)  # token scores are still there
    assert [(r.index, r.reason) for r in batch.rejected] == [(3, "MISSING_SAMPLES")]
    assert batch.method is UncertaintyMethod.SAMPLE_CLUSTERS
