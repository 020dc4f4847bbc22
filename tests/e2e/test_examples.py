"""The example scripts in examples/ run as a user runs them (`python examples/<name>.py` from
the repository root), exit 0 and print what they promise."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]

# Lines a user would look for in each example's output.
IN_PROCESS = {
    "realtime_composition_example": [
        "Registered retailer-support v1 (rank 8)",
        "Registered bank-support v1 (rank 16)",
        "Composed (cat, half and half of retailer-support v1, bank-support v1):",
        "Composed (svd, half and half of retailer-support v1, bank-support v1):",
        "  served as composed:",
        "Streaming with bank-support: ",
        "Registered retailer-support v2: it serves new requests at once",
        "Hot-swap: v2 -> v1\n  retailer-support v1: ",
        "Rollback: v1 -> v2\n  retailer-support v2: ",
        "Adapter cache:",
        "  host: ",  # after the device tier when the model runs on a GPU
    ],
    "active_learning_example": [
        "Generated 12 replies; mean token entropy of each:",
        "The 3 most uncertain replies, for a reviewer, by entropy:\n  #1  score ",
        "  #3  score ",
        "3 uncertain replies unlike each other (hybrid strategy), by margin:\n  #1  score ",
    ],
    "adapter_analytics_example": [
        "Refused as expected: max_new_tokens must be between",
        ": 10 events accepted",
        "Re-sent the same batch: duplicate=True, reported accepted=10, counted once",
        "requests 4, successes 3, errors {'INVALID_ARGUMENT': 1}",
        "success rate 75%",
        "by tokens_per_second: ",
        "by p95_latency: ",
        "by success_rate: ",
    ],
    "ab_testing_example": [
        "Experiment 'support-adapter' running: control=support-a, treatment=support-b",
        "  user-0 -> control (bucket 0.2662)",  # GrowthBook's hash: the same everywhere
        "Assigned again: same variants=True, sticky=[True, True, True, True]",
        "Results (users per variant: [21, 19]):",
        "Recommendation: ",
    ],
}
END_TO_END = [
    "1. Completion from retailer-support v1:",
    "2. Experiment 'support-b-test' started",
    "   alice  -> control   (retailer-support): ",
    "3. Streaming a completion: ",
    "4. Feedback queue: 9 outputs waiting",
    "5. Analytics for retailer-support: 6 requests, success rate 100%",
    "   Experiment users per variant: [3, 3]",
    "   Recommendation: ",
    "Stopping the stack...",
]


def run_example(name: str, env: dict[str, str]) -> str:
    proc = subprocess.run(
        [sys.executable, f"examples/{name}.py"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, (
        f"{name} exited with {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}"
        f"\n--- stderr\n{proc.stderr[-4000:]}"
    )
    assert proc.stdout.rstrip().endswith("Done."), proc.stdout
    return proc.stdout


@pytest.mark.parametrize("name", sorted(IN_PROCESS))
def test_in_process_example(name, redis_url, tmp_path):
    """On the session's redis-server (REDIS_URL), so the example starts none of its own."""
    env = {
        **os.environ,
        "REDIS_URL": redis_url,
        "ADAPTER_STORE_DIR": str(tmp_path / "adapter-store"),
    }
    out = run_example(name, env)
    for line in IN_PROCESS[name]:
        assert line in out, f"{line!r} not in the output:\n{out}"


def test_end_to_end_workflow():
    """Starts its own redis-server and stack on free ports, and stops them."""
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "ADAPTER_STORE_DIR")}
    out = run_example("end_to_end_workflow", env)
    for line in END_TO_END:
        assert line in out, f"{line!r} not in the output:\n{out}"
