"""The vectorised write path (services.analytics.ingest) against plain per-event Python:
the same rejections, the same sketch bins, the same sums. No servers."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from services.analytics.core import Event, events_to_columns, reject_reason
from services.analytics.ingest import (
    COARSE_EDGES,
    COUNTERS,
    RANK_RECORD,
    RANK_STATS,
    Aggregated,
    sketch_bins,
    unpack,
)
from services.analytics.settings import AnalyticsSettings
from services.analytics.sketch import GAMMA, ZERO, ZERO_INDEX, bucket_index, bucket_key

NOW = 1_800_000_000.0
SETTINGS = AnalyticsSettings()


def random_events(seed: int, n: int, tenants: tuple[str, ...] = ("t0", "t1")) -> list[Event]:
    """Several tenants, adapters and series; times across an hour boundary; errors,
    missing ttft, feedback; and a sprinkling of every kind of bad event."""
    rng = np.random.default_rng(seed)
    hour_edge = (NOW // 3600) * 3600
    statuses = ["OK"] * 6 + ["DEADLINE_EXCEEDED", "INTERNAL", "UNAVAILABLE", "CANCELLED"]
    events = []
    for _ in range(n):
        e = Event(
            tenant=tenants[rng.integers(len(tenants))],
            adapter=f"a-{rng.integers(7)}",
            version=int(rng.integers(3)),
            experiment=["", "exp"][rng.integers(2)],
            variant=["", "a", "b"][rng.integers(3)],
            time=float(hour_edge + rng.uniform(-150, 150)) if rng.random() < 0.8 else None,
            status=statuses[rng.integers(len(statuses))],
            latency_seconds=float(rng.lognormal(-1.5, 1.0)),
            ttft_seconds=float(rng.uniform(0, 0.1)) if rng.random() < 0.7 else None,
            prompt_tokens=int(rng.integers(0, 500)),
            completion_tokens=int(rng.integers(0, 200)),
        )
        if rng.random() < 0.15:
            e.kind, e.rating = "feedback", float(rng.integers(1, 6))
        if rng.random() < 0.05:
            e.latency_seconds = 0.0  # the zero bucket
        bad = rng.random()
        if bad < 0.02:
            e.latency_seconds = -1.0
        elif bad < 0.04:
            e.latency_seconds = math.nan
        elif bad < 0.05:
            e.status = "TEAPOT"
        elif bad < 0.06:
            e.adapter = ""
        elif bad < 0.07:
            e.time = NOW + 3600
        elif bad < 0.08:
            e.kind = ""
        elif bad < 0.09:
            e.latency_seconds = 1e9
        elif bad < 0.10:
            e.completion_tokens = 2**40
        elif bad < 0.11:
            e.kind, e.rating = "feedback", 1e300
        elif bad < 0.12:
            e.ttft_seconds = math.inf
        elif bad < 0.13:
            e.ttft_seconds = 1e7
        events.append(e)
    return events


def applied(batch: Aggregated) -> dict[str, dict[str, object]]:
    """What lua/record.lua leaves in an empty Redis, computed from the script's arguments
    in Python: hash key -> field -> int, or tuple of floats for a record."""
    out: dict[str, dict[str, object]] = {}
    for write in batch.tenant_writes("b", {}):
        _, payload, blob, prefix, _, _ = write.args(60)
        for op, start, suffix, fields, incs in json.loads(payload):
            hour = start - start % 3600
            for k in (f"{prefix}:m:{start}{suffix}", f"{prefix}:h:{hour}{suffix}"):
                h = out.setdefault(k, {})
                for f, inc in zip(fields, incs, strict=True):
                    if op == 0:
                        h[f] = h.get(f, 0) + inc
                    else:
                        add = unpack(blob[inc - 1 : inc - 1 + 8 * op])
                        old = h.get(f, (0.0,) * op)
                        h[f] = tuple(a + b for a, b in zip(old, add, strict=True))
    return out


def reference(events: list[Event], now: float = NOW) -> dict[str, dict[str, object]]:
    """The same, one event at a time, the obvious way."""
    out: dict[str, dict[str, list | int]] = {}
    for e in events:
        if reject_reason(e, now, SETTINGS):
            continue
        when = now if e.time is None else e.time
        series = f"{e.version}|{e.experiment}|{e.variant}|"
        counters = dict.fromkeys(COUNTERS, 0.0)
        if e.kind == "request":
            counters["n"] = 1
            counters["ok" if e.status == "OK" else f"e.{e.status}"] = 1
            counters["pt"], counters["ct"] = e.prompt_tokens, e.completion_tokens
            counters["ls"], counters["ls2"] = e.latency_seconds, e.latency_seconds**2
            if e.ttft_seconds is not None:
                counters["tn"], counters["ts"] = 1, e.ttft_seconds
                counters["ts2"] = e.ttft_seconds**2
        else:
            counters["rn"], counters["rs"], counters["rs2"] = 1, e.rating, e.rating**2
        for tag, start in (("m", when // 60 * 60), ("h", when // 3600 * 3600)):
            prefix = f"lp:{{{e.tenant}}}:an:{tag}:{int(start)}"
            c = out.setdefault(f"{prefix}:c:{e.adapter}", {})
            record = c.setdefault(series + "*", [0.0] * len(COUNTERS))
            for i, stat in enumerate(COUNTERS):
                record[i] += counters[stat]
            rank = out.setdefault(f"{prefix}:rank", {}).setdefault(e.adapter, [0.0] * RANK_RECORD)
            for i, stat in enumerate(RANK_STATS):
                rank[i] += counters[stat]
            if e.kind == "request":  # the coarse histogram
                b = bucket_index(e.latency_seconds)
                rank[len(RANK_STATS) + sum(edge < b for edge in COARSE_EDGES)] += 1
            if e.kind == "request":
                s = out.setdefault(f"{prefix}:s:{e.adapter}", {})
                field = series + bucket_key(e.latency_seconds)
                s[field] = s.get(field, 0) + 1
    return out


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_batch_sums_equal_per_event_sums(seed):
    events = random_events(seed, 1_500)
    batch = Aggregated(events_to_columns(events), NOW, SETTINGS, {})
    got, want = applied(batch), reference(events)
    assert got.keys() == want.keys()
    for k, fields in want.items():
        assert got[k].keys() == fields.keys(), k
        for f, value in fields.items():
            if isinstance(value, int):
                assert got[k][f] == value, (k, f)
            else:
                assert got[k][f] == pytest.approx(value, rel=1e-12, abs=1e-12), (k, f)


@pytest.mark.parametrize("seed", [4, 5])
def test_batch_rejections_equal_per_event_checks(seed):
    events = random_events(seed, 2_000)
    batch = Aggregated(events_to_columns(events), NOW, SETTINGS, {})
    expected = [(i, r) for i, e in enumerate(events) if (r := reject_reason(e, NOW, SETTINGS))]
    assert batch.rejected == expected
    assert {r for _, r in expected} >= {
        "NEGATIVE_LATENCY",
        "NOT_FINITE",
        "UNKNOWN_STATUS",
        "MISSING_ADAPTER",
        "TIMESTAMP_IN_FUTURE",
        "MISSING_KIND",
        "LATENCY_TOO_LARGE",
        "TOO_MANY_TOKENS",
        "RATING_OUT_OF_RANGE",
    }
    assert batch.accepted == len(events) - len(expected)


def test_vectorised_bins_equal_bucket_index():
    values = np.concatenate(
        [
            [0.0, 1e-7, 1e-6, 1.0000001e-6, 1e6],
            GAMMA ** np.arange(-690, 700, dtype=np.float64),  # bucket edges
            np.geomspace(1.1e-6, 1e6, 20_000),
        ]
    )
    bins = sketch_bins(values)
    for v, b in zip(values.tolist(), bins.tolist(), strict=True):
        want = bucket_index(v)
        if want == ZERO_INDEX:
            assert bucket_key(v) == ZERO and b < -(2**14)
        else:
            # at an exact edge the two logs may round apart; either bin is within alpha
            assert abs(b - want) <= 1, v
            estimate = 2 * GAMMA**b / (GAMMA + 1)
            assert abs(estimate - v) <= 0.01 * v * (1 + 1e-9)
