"""What the record script leaves in a real Redis, and TopAdapters against brute force."""

from __future__ import annotations

import time
import uuid
import zlib

import numpy as np
import pytest

from services.analytics.core import AnalyticsCore, Event
from services.analytics.ingest import RANK_STATS, pack, unpack
from services.analytics.settings import AnalyticsSettings
from services.analytics.sketch import LatencySketch
from services.common.redis import connect
from tests.unit.analytics.test_analytics_ingest import random_events, reference

pytestmark = pytest.mark.integration

SETTINGS = AnalyticsSettings()


@pytest.fixture
async def core(redis_url):
    redis = connect(redis_url)
    yield AnalyticsCore(SETTINGS, redis)
    await redis.aclose()


async def stored(redis, keys) -> dict[str, dict[str, object]]:
    out = {}
    for k in keys:
        raw = await redis.hgetall(k)
        out[k] = {
            f.decode(): unpack(v) if k.endswith(":rank") or f.endswith(b"*") else int(v)
            for f, v in raw.items()
        }
    return out


def assert_same(got, want):
    assert got.keys() == want.keys()
    for k, fields in want.items():
        assert got[k].keys() == fields.keys(), k
        for f, value in fields.items():
            if isinstance(value, int):
                assert got[k][f] == value, (k, f)
            else:
                assert got[k][f] == pytest.approx(value, rel=1e-12, abs=1e-12), (k, f)


async def test_script_stores_the_per_event_sums_with_roll_up_and_expiry(core):
    now = time.time()
    tenants = (f"s-{uuid.uuid4().hex[:8]}", f"s-{uuid.uuid4().hex[:8]}")
    events = random_events(7, 1_200, tenants)
    for e in events:  # around an hour boundary that is inside every retention
        if e.time is not None:
            e.time = e.time - 1_800_000_000.0 + (now // 3600 - 2) * 3600
    result = await core.record_batch("first", events, now=now)
    assert not result.duplicate
    want = reference(events, now)
    got = await stored(core.redis, want)
    assert_same(got, want)
    for k in want:  # every hash expires at its bucket's end plus the retention
        tag, start = k.split(":")[3:5]
        life = 60 + SETTINGS.minute_retention_seconds if tag == "m" else 3600
        life += 0 if tag == "m" else SETTINGS.hour_retention_seconds
        assert await core.redis.execute_command("EXPIRETIME", k) == int(start) + life, k
    # The same events again (another batch id): every field doubles -- read-add-write on
    # existing fields and records -- and the expiry stays.
    again = await core.record_batch("second", events, now=now)
    assert again.accepted == result.accepted and not again.duplicate
    doubled = {
        k: {f: v * 2 if isinstance(v, int) else [x * 2 for x in v] for f, v in fields.items()}
        for k, fields in want.items()
    }
    assert_same(await stored(core.redis, want), doubled)
    for k in want:
        tag, start = k.split(":")[3:5]
        assert await core.redis.execute_command("EXPIRETIME", k) > int(start), k
    # And the first id once more: counted once, nothing changes.
    third = await core.record_batch("first", events, now=now)
    assert third.duplicate
    assert_same(await stored(core.redis, want), doubled)


def brute_force(events: list[Event], metric: str, limit: int, min_requests: int):
    by: dict[str, list[Event]] = {}
    for e in events:
        by.setdefault(e.adapter, []).append(e)
    rows = []
    for adapter, evs in by.items():
        req = [e for e in evs if e.kind == "request"]
        fb = [e for e in evs if e.kind == "feedback"]
        n = len(req)
        if n < min_requests:
            continue
        if metric == "avg_rating":
            if not fb:
                continue
            value = sum(e.rating for e in fb) / len(fb)
        elif not n:
            continue
        elif metric == "requests":
            value = n
        elif metric == "success_rate":
            value = sum(e.status == "OK" for e in req) / n
        elif metric == "tokens_per_second":
            ls = sum(e.latency_seconds for e in req)
            value = sum(e.completion_tokens for e in req) / ls if ls > 0 else 0.0
        else:
            value = LatencySketch.of(e.latency_seconds for e in req).quantile(0.95)
        rows.append((adapter, value, n))
    sign = 1 if metric == "p95_latency" else -1
    rows.sort(key=lambda r: (sign * r[1], -r[2], r[0].encode()))
    return rows[:limit]


@pytest.mark.parametrize(
    "metric", ["requests", "success_rate", "avg_rating", "tokens_per_second", "p95_latency"]
)
@pytest.mark.parametrize(("limit", "min_requests"), [(7, 0), (50, 3)])
async def test_top_adapters_equals_brute_force(core, metric, limit, min_requests):
    """Many adapters over several minutes and series, with ties: the ranking, values and
    requests are those of a brute-force pass over the raw events (p95: the sketch of all
    the adapter's latencies, so within the sketch's 1% of the exact p95)."""
    tenant = f"top-{uuid.uuid4().hex[:8]}"
    # A seed of its own per case, the same on every run (hash() of a str is salted).
    rng = np.random.default_rng(zlib.crc32(f"{metric}:{limit}".encode()))
    start = (time.time() // 3600 - 2) * 3600
    statuses = ["OK", "OK", "OK", "INTERNAL"]
    events = []
    for a in range(40):
        name = f"ad-{a % 13}.{a}" if a % 3 else f"Ad_{a}"
        for _ in range(int(rng.integers(0, 45)) if a % 5 else int(rng.integers(0, 4))):
            events.append(
                Event(
                    tenant,
                    name,
                    int(rng.integers(2)),
                    "",
                    ["", "x"][int(rng.integers(2))],
                    start + float(rng.uniform(0, 900)),
                    status=statuses[int(rng.integers(4))],
                    latency_seconds=float(rng.choice([0.1, 0.2, 0.35, rng.lognormal(-1, 1)])),
                    completion_tokens=int(rng.choice([10, 20])),
                )
            )
        if a % 4 == 0:
            events.append(Event(tenant, name, 1, "", "", start + 5, kind="feedback", rating=4.0))
    for i in range(0, len(events), 97):
        await core.record_batch(f"b{i}", events[i : i + 97])
    got, _ = await core.top_adapters(tenant, metric, limit, 3600, start + 3600, min_requests)
    want = brute_force(events, metric, limit, min_requests)
    assert [(r.adapter, r.requests) for r in got] == [(a, n) for a, _, n in want]
    assert [r.value for r in got] == pytest.approx([v for _, v, _ in want], rel=1e-9)


def test_pack_roundtrip():
    values = (1.0, 0.1, 2.0**60, -3.5)
    assert unpack(pack(values)) == values
    assert len(RANK_STATS) == 6


async def test_a_batch_over_thousands_of_adapters_is_written_in_chunks(core):
    """4,500 adapters in one batch: the rank hash op is split (HMGET/HSET of at most 2,000
    fields; one HSET of 4,500 would pass Lua's unpack() 9,000 values, over its limit) and
    every adapter is still counted once."""
    tenant, at = f"wide-{uuid.uuid4().hex[:8]}", (time.time() // 3600 - 2) * 3600 + 30
    events = [
        Event(tenant, f"a{i:05d}", 1, "", "", at, latency_seconds=0.01 * (1 + i % 9))
        for i in range(4_500)
    ] + [Event(tenant, "a00007", 1, "", "", at, latency_seconds=0.5)]
    assert (await core.record_batch("wide", events)).accepted == 4_501
    ranks = await core.redis.hgetall(f"lp:{{{tenant}}}:an:h:{int(at // 3600 * 3600)}:rank")
    assert len(ranks) == 4_500
    assert sum(unpack(v)[0] for v in ranks.values()) == 4_501
    top, _ = await core.top_adapters(tenant, "requests", 3, 3600, at + 60)
    assert [(r.adapter, r.requests) for r in top] == [("a00007", 2), ("a00000", 1), ("a00001", 1)]
    m, _ = await core.adapter_metrics(tenant, "a04499", 3600, at + 60)
    assert m.requests == 1 and m.latency_sum == pytest.approx(0.01 * (1 + 4499 % 9))


async def test_every_counter_of_a_record_reaches_metrics(core):
    """Sums of squares, ttft count and errors by code come back from the records (the
    experiments service's variances are computed from them)."""
    tenant, at = f"rec-{uuid.uuid4().hex[:8]}", (time.time() // 3600 - 2) * 3600 + 30
    lat, ttft = [0.1, 0.2, 0.4], [0.01, 0.03]
    events = [
        Event(tenant, "x", 1, "e", "a", at, latency_seconds=v, ttft_seconds=t, prompt_tokens=3)
        for v, t in zip(lat, [*ttft, None], strict=True)
    ]
    events += [Event(tenant, "x", 1, "e", "a", at, status="CANCELLED", latency_seconds=1.0)]
    events += [Event(tenant, "x", 1, "e", "a", at, kind="feedback", rating=r) for r in (2, 5)]
    await core.record_batch("rec", events)
    for window in (3600, 24 * 3600):  # minute buckets, then hour buckets
        m, _ = await core.adapter_metrics(tenant, "x", window, at + 60)
        assert (m.requests, m.successes, m.errors_by_code) == (4, 3, {"CANCELLED": 1})
        assert (m.prompt_tokens, m.ttft_count, m.rating_count) == (9, 2, 2)
        assert m.latency_sum_sq == pytest.approx(sum(v * v for v in [*lat, 1.0]))
        assert m.ttft_sum_sq == pytest.approx(sum(t * t for t in ttft))
        assert (m.rating_sum, m.rating_sum_sq) == pytest.approx((7.0, 29.0))


async def test_p95_ranking_reads_only_the_sketches_it_needs_and_stays_exact(core):
    """The coarse histograms in the rank records spare most sketch reads when adapters'
    latencies differ, and the answer stays exact."""
    tenant, at = f"prune-{uuid.uuid4().hex[:8]}", (time.time() // 3600 - 2) * 3600 + 30
    rng = np.random.default_rng(5)
    events = []
    for a in range(300):
        scale = 0.02 if a % 50 == 0 else 2.0  # 6 fast adapters, 294 slow ones
        for _ in range(5):
            latency = float(scale * rng.lognormal(0, 0.3))
            events.append(Event(tenant, f"p{a:03d}", 1, "", "", at, latency_seconds=latency))
    await core.record_batch("prune", events)
    want = brute_force(events, "p95_latency", 5, 0)

    async def hgetall_calls() -> int:
        stats = await core.redis.info("commandstats")
        return stats.get("cmdstat_hgetall", {}).get("calls", 0)

    async def ranked_and_reads():
        before = await hgetall_calls()
        got, win = await core.top_adapters(tenant, "p95_latency", 5, 3600, at + 60)
        sketches = await hgetall_calls() - before - len(win.buckets)  # less the rank hashes
        return [(r.adapter, r.value, r.requests) for r in got], sketches

    got, sketches_read = await ranked_and_reads()
    assert [(a, n) for a, _, n in got] == [(a, n) for a, _, n in want]
    assert [v for _, v, _ in got] == pytest.approx([v for _, v, _ in want], rel=1e-9)
    assert sketches_read <= 10  # the 6 fast adapters' coarse bins, not 300 sketches


async def test_p95_pruning_reads_on_until_the_top_is_full(core):
    """The best adapter's coarse bin alone does not fill a top of 2: the next coarse bin is
    read too, and its best adapter completes the top."""
    tenant, at = f"prune2-{uuid.uuid4().hex[:8]}", (time.time() // 3600 - 2) * 3600 + 30
    latencies = {"fast": 0.02, "mid": 0.05, "good": 0.04, "slow1": 2.0, "slow2": 3.0}
    events = [
        Event(tenant, name, 1, "", "", at, latency_seconds=latency)
        for name, latency in latencies.items()
        for _ in range(5)
    ]
    await core.record_batch("prune2", events)
    got, _ = await core.top_adapters(tenant, "p95_latency", 2, 3600, at + 60)
    assert [r.adapter for r in got] == ["fast", "good"]
