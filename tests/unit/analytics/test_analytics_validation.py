"""Per-event validation and batch limits of the analytics domain layer (no servers)."""

from __future__ import annotations

import math

import pytest

from services.analytics.core import AnalyticsCore, Event, Metrics, reject_reason
from services.analytics.settings import AnalyticsSettings
from services.common.errors import InvalidArgument

NOW = 1_800_000_000.0
SETTINGS = AnalyticsSettings(max_batch_events=5)


def ok(**kw) -> Event:
    base = dict(tenant="acme", adapter="support", latency_seconds=0.2, completion_tokens=3)
    return Event(**{**base, **kw})


@pytest.mark.parametrize(
    ("event", "reason"),
    [
        (ok(), None),
        (ok(kind="feedback", rating=4.0), None),
        (ok(latency_seconds=0.0, ttft_seconds=0.0), None),
        (ok(adapter=""), "MISSING_ADAPTER"),
        (ok(adapter="../etc"), "INVALID_ADAPTER_NAME"),
        (ok(adapter="a|b"), "INVALID_ADAPTER_NAME"),
        (ok(tenant="Bad Tenant"), "INVALID_TENANT"),
        (ok(tenant=""), "INVALID_TENANT"),
        (ok(experiment="exp|1"), "INVALID_EXPERIMENT"),
        (ok(variant="a:b"), "INVALID_VARIANT"),
        (ok(latency_seconds=-0.001), "NEGATIVE_LATENCY"),
        (ok(ttft_seconds=-1.0), "NEGATIVE_LATENCY"),
        (ok(latency_seconds=math.nan), "NOT_FINITE"),
        (ok(latency_seconds=math.inf), "NOT_FINITE"),
        (ok(ttft_seconds=math.nan), "NOT_FINITE"),
        (ok(kind="feedback", rating=math.nan), "NOT_FINITE"),
        (ok(status=""), "UNKNOWN_STATUS"),
        (ok(status="TEAPOT"), "UNKNOWN_STATUS"),
        (ok(prompt_tokens=-1), "NEGATIVE_TOKENS"),
        (ok(kind=""), "MISSING_KIND"),
        (ok(time=NOW + 3600), "TIMESTAMP_IN_FUTURE"),
        (ok(time=NOW - 365 * 86400), "TIMESTAMP_TOO_OLD"),
        (ok(version=2**32), "INVALID_VERSION"),
        (ok(latency_seconds=2e6), "LATENCY_TOO_LARGE"),
        (ok(ttft_seconds=2e6), "LATENCY_TOO_LARGE"),
        (ok(completion_tokens=2**33), "TOO_MANY_TOKENS"),
        (ok(kind="feedback", rating=-1e7), "RATING_OUT_OF_RANGE"),
    ],
)
def test_reject_reason(event, reason):
    assert reject_reason(event, NOW, SETTINGS) == reason


@pytest.mark.parametrize(
    ("event", "reason"),
    [  # docs/analytics.md: latency or ttft over 10^6 s, over 2^32 tokens, |rating| over 10^6
        (ok(latency_seconds=1e6, ttft_seconds=1e6), None),
        (ok(latency_seconds=1e6 + 1), "LATENCY_TOO_LARGE"),
        (ok(ttft_seconds=1e6 + 1), "LATENCY_TOO_LARGE"),
        (ok(prompt_tokens=2**32, completion_tokens=2**32), None),
        (ok(prompt_tokens=2**32 + 1), "TOO_MANY_TOKENS"),
        (ok(kind="feedback", rating=-1e6), None),
        (ok(kind="feedback", rating=1e6 + 1), "RATING_OUT_OF_RANGE"),
        (ok(time=NOW + 300), None),  # max_future_skew_seconds: 5 minutes
        (ok(time=NOW + 301), "TIMESTAMP_IN_FUTURE"),
        (ok(time=NOW - 30 * 86400), None),  # the hour retention: 30 days
        (ok(time=NOW - 30 * 86400 - 1), "TIMESTAMP_TOO_OLD"),
    ],
)
def test_the_documented_limits(event, reason):
    assert reject_reason(event, NOW, AnalyticsSettings()) == reason


class _NoRedis:
    """Fails the test if the domain layer reaches Redis."""

    def register_script(self, script):
        return None

    def pipeline(self, **kw):
        raise AssertionError("must not touch redis")


async def test_oversized_batch_is_invalid_argument_and_all_bad_batch_writes_nothing():
    core = AnalyticsCore(SETTINGS, _NoRedis())
    with pytest.raises(InvalidArgument) as info:
        await core.record_batch("b1", [ok()] * 6)
    assert info.value.reason == "BATCH_TOO_LARGE"
    with pytest.raises(InvalidArgument) as info:
        await core.record_batch("", [ok()])
    assert info.value.reason == "INVALID_BATCH_ID"
    result = await core.record_batch(
        "b2", [ok(adapter=""), ok(latency_seconds=-1), ok(prompt_tokens=10**30)], now=NOW
    )
    assert result.accepted == 0
    assert result.rejected == [
        (0, "MISSING_ADAPTER"),
        (1, "NEGATIVE_LATENCY"),
        (2, "TOO_MANY_TOKENS"),
    ]
    assert result.rejected_by_reason == {
        "MISSING_ADAPTER": 1,
        "NEGATIVE_LATENCY": 1,
        "TOO_MANY_TOKENS": 1,
    }


def test_rating_stddev_from_sums_of_squares():
    ratings = [1.0, 4.0, 5.0, 5.0, 3.0]
    m = Metrics(
        rating_count=len(ratings),
        rating_sum=sum(ratings),
        rating_sum_sq=sum(r * r for r in ratings),
    )
    mean = sum(ratings) / 5
    expected = math.sqrt(sum((r - mean) ** 2 for r in ratings) / 4)
    assert m.rating_mean == pytest.approx(mean)
    assert m.rating_stddev == pytest.approx(expected)
