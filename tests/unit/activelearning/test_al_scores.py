"""Uncertainty scores: hand-computed values, logits, and every bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest

from services.activelearning.scores import (
    TOKEN_METHODS,
    CandidateError,
    UncertaintyMethod,
    parse_method,
    ragged_scores,
    score_logits,
    score_tokens,
    token_stats_from_logits,
)
from services.common.errors import InvalidArgument


def test_scores_from_token_statistics_by_hand():
    p = [0.9, 0.5, 0.8]
    lp = [math.log(x) for x in p]
    s = score_tokens(lp, [0.2, 1.1, 0.5])
    assert s.entropy == pytest.approx((0.2 + 1.1 + 0.5) / 3)
    assert s.max_entropy == pytest.approx(1.1)
    assert s.least_confidence == pytest.approx(1 - 0.9 * 0.5 * 0.8)
    assert s.nll == pytest.approx(-sum(lp) / 3)
    # Without margins: p1 - p2 approximated by 2p - 1 per token (clipped at 0).
    assert s.margin == pytest.approx(1 - (0.8 + 0.0 + 0.6) / 3)
    # Given margins are used as they are.
    assert score_tokens(lp, [0.2, 1.1, 0.5], [0.5, 0.5, 1.0]).margin == pytest.approx(1 / 3)


def test_least_confidence_ranks_by_total_nll_where_the_score_saturates():
    long_sure = score_tokens([-1.0] * 60, [0.1] * 60)
    long_less_sure = score_tokens([-1.1] * 60, [0.1] * 60)
    assert long_sure.least_confidence == long_less_sure.least_confidence == 1.0  # saturated
    method = UncertaintyMethod.LEAST_CONFIDENCE
    assert long_less_sure.rank_value(method) > long_sure.rank_value(method)


def test_logits_give_exact_entropy_and_margin():
    logits = np.log(np.array([[0.7, 0.2, 0.1], [0.4, 0.35, 0.25]]))
    lp, ent, margin = token_stats_from_logits(logits)
    assert lp == pytest.approx(np.log([0.7, 0.4]))
    assert ent[0] == pytest.approx(
        -(0.7 * math.log(0.7) + 0.2 * math.log(0.2) + 0.1 * math.log(0.1))
    )
    assert margin == pytest.approx([0.5, 0.05])
    # Sampled (not argmax) tokens: their log-probabilities, the same margins.
    lp2, _, margin2 = token_stats_from_logits(logits, [2, 1])
    assert lp2 == pytest.approx(np.log([0.1, 0.35]))
    assert margin2 == pytest.approx([0.5, 0.05])
    assert score_logits(logits).margin == pytest.approx(1 - (0.5 + 0.05) / 2)


def test_masked_minus_inf_logits_are_probability_zero():
    logits = np.array([[2.0, 1.0, -np.inf], [0.0, 0.0, -np.inf]])
    s = score_logits(logits)
    assert s.max_entropy == pytest.approx(math.log(2))
    assert math.isfinite(s.entropy)


@pytest.mark.parametrize(
    ("logits", "reason"),
    [
        (np.array([[0.1, np.nan, 0.3]]), "NOT_FINITE"),
        (np.array([[0.1, np.inf, 0.3]]), "NOT_FINITE"),
        (np.array([[-np.inf, -np.inf, -np.inf]]), "NOT_FINITE"),
        (np.zeros((0, 5)), "EMPTY_OUTPUT"),
        (np.zeros(5), "BAD_LOGITS_SHAPE"),
    ],
)
def test_bad_logits_are_clear_errors(logits, reason):
    with pytest.raises(CandidateError) as err:
        score_logits(logits)
    assert err.value.reason == reason


def test_logits_and_token_ids_of_different_lengths():
    with pytest.raises(CandidateError) as err:
        score_logits(np.zeros((3, 4)), [1, 2])
    assert err.value.reason == "LENGTH_MISMATCH"


@pytest.mark.parametrize(
    ("lp", "ent", "margins", "reason"),
    [
        ([], [], None, "EMPTY_OUTPUT"),
        ([-0.1, -0.2], [0.3], None, "LENGTH_MISMATCH"),
        ([-0.1, -0.2], [0.3, 0.2], [0.5], "LENGTH_MISMATCH"),
        ([-0.1, float("nan")], [0.3, 0.2], None, "NOT_FINITE"),
        ([-0.1, -0.2], [float("inf"), 0.2], None, "NOT_FINITE"),
        ([0.5], [0.3], None, "INVALID_LOGPROB"),
        ([-0.5], [-0.3], None, "INVALID_ENTROPY"),
        ([-0.5], [0.3], [1.5], "INVALID_MARGIN"),
    ],
)
def test_bad_token_statistics_are_clear_errors(lp, ent, margins, reason):
    with pytest.raises(CandidateError) as err:
        score_tokens(lp, ent, margins)
    assert err.value.reason == reason


def test_methods_by_name_and_unknown_method():
    assert parse_method("margin") is UncertaintyMethod.MARGIN
    assert parse_method(UncertaintyMethod.NLL) is UncertaintyMethod.NLL
    with pytest.raises(InvalidArgument) as err:
        parse_method("vibes")
    assert err.value.reason == "UNKNOWN_METHOD"


def test_ragged_scores_equal_one_by_one_scores():
    rng = np.random.default_rng(3)
    lengths = rng.integers(1, 12, 50)
    lp = -rng.exponential(0.5, lengths.sum()).astype(np.float32)
    ent = rng.exponential(1.0, lengths.sum()).astype(np.float32)
    matrix = ragged_scores(lp, ent, lengths)
    start = 0
    for i, n in enumerate(lengths):
        s = score_tokens(lp[start : start + n], ent[start : start + n])
        start += n
        expected = [s.rank_value(m) for m in TOKEN_METHODS]
        assert matrix[i] == pytest.approx(expected, rel=1e-5)
