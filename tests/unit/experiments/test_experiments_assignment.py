"""Assignment agrees with the growthbook package (the reference SDK) on random inputs."""

from __future__ import annotations

import random
import string

import pytest
from growthbook import GrowthBook
from growthbook.common_types import Experiment
from growthbook.core import chooseVariation, fnv1a32, gbhash, getBucketRanges, inNamespace

from services.experiments import assignment

ALPHABET = string.ascii_letters + string.digits + "-_.@ é漢😀"
WEIGHTS = [[0.5, 0.5], [0.1, 0.9], [0.2, 0.3, 0.5], [1 / 3, 1 / 3, 1 / 3], [0.25] * 4]
COVERAGES = [1.0, 0.5, 0.05, 0.0, 0.999]
NAMESPACES = [None, ("ns", 0.0, 0.5), ("checkout", 0.3, 0.7), ("x", 0.5, 1.0)]


def random_id(rng: random.Random) -> str:
    return "".join(rng.choice(ALPHABET) for _ in range(rng.randint(0, 24)))


def reference(uid, seed, version, weights, coverage, namespace) -> tuple[int, float]:
    n = gbhash(seed, uid, version)
    if namespace is not None and not inNamespace(uid, namespace):
        return -1, n
    return chooseVariation(n, getBucketRanges(len(weights), coverage, weights)), n


@pytest.mark.parametrize("version", [1, 2])
def test_hash_matches_growthbook(version):
    rng = random.Random(version)
    for _ in range(3000):
        seed, uid = random_id(rng), random_id(rng)
        assert assignment.gb_hash(seed, uid, version) == gbhash(seed, uid, version)
        assert assignment.fnv1a32(seed + uid) == fnv1a32(seed + uid)


@pytest.mark.parametrize("version", [1, 2])
def test_assignment_matches_growthbook_functions(version):
    rng = random.Random(100 + version)
    checked = excluded = 0
    for weights in WEIGHTS:
        for coverage in COVERAGES:
            for namespace in NAMESPACES:
                seed = random_id(rng) or "exp"
                for _ in range(150):
                    uid = random_id(rng)
                    got = assignment.assign(uid, seed, version, weights, coverage, namespace)
                    want = reference(uid, seed, version, weights, coverage, namespace)
                    assert (got.variant_index, got.bucket) == want, (uid, seed, weights)
                    checked += 1
                    excluded += got.variant_index < 0
    assert checked == len(WEIGHTS) * len(COVERAGES) * len(NAMESPACES) * 150
    assert 0 < excluded < checked  # both outcomes were exercised


@pytest.mark.parametrize("version", [1, 2])
def test_assignment_matches_growthbook_run(version):
    """End to end through GrowthBook.run(), the SDK's public entry point."""
    rng = random.Random(200 + version)
    for _ in range(600):
        weights = rng.choice(WEIGHTS)
        coverage = rng.choice(COVERAGES)
        namespace = rng.choice(NAMESPACES)
        key = "exp-" + str(rng.randint(0, 99))
        uid = random_id(rng) or "u"
        gb = GrowthBook(attributes={"id": uid})
        result = gb.run(
            Experiment(
                key=key,
                variations=list(range(len(weights))),
                weights=weights,
                coverage=coverage,
                namespace=namespace,
                hashVersion=version,
            )
        )
        got = assignment.assign(uid, key, version, weights, coverage, namespace)
        want = result.variationId if result.inExperiment else -1
        assert got.variant_index == want, (uid, key, weights, coverage, namespace)


def test_raising_coverage_never_moves_an_assigned_unit():
    rng = random.Random(7)
    for _ in range(2000):
        uid = random_id(rng)
        low = assignment.assign(uid, "seed", 2, [0.3, 0.7], 0.2)
        high = assignment.assign(uid, "seed", 2, [0.3, 0.7], 0.8)
        if low.in_experiment:
            assert high.variant_index == low.variant_index


def test_unknown_hash_version_is_rejected():
    with pytest.raises(ValueError):
        assignment.gb_hash("s", "u", 3)
