"""End to end: the whole loraplex stack, used over HTTP the way an application would.

Starts a redis-server and the stack (inference, analytics, experiments, active learning and
the OpenAI-compatible gateway, as `make run` does) on free ports, then, as the demo tenant
"retailer":
  1. asks for a completion with its adapter through the official `openai` client;
  2. uploads a second adapter (admin API) and starts an A/B experiment between the two
     over REST, then sends users' traffic through `model: "experiment:<key>"`;
  3. streams a completion;
  4. reviews the outputs the feedback queue hands out, most uncertain first;
  5. reads the adapter's analytics and the experiment's results;
and stops everything.

    .venv/bin/python examples/end_to_end_workflow.py
"""

import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx
import openai

from services.common.localhost import free_port, start_redis_server
from services.stack import LocalStack, start_on_free_ports

ADAPTERS = Path(__file__).resolve().parent.parent / "models" / "adapters"
PROMPT = "Customer: Where is my order 4821?\nAgent:"
SHOP_WORDS = set(
    "order ship shipped deliver delivery return refund package parcel tracking item size"
    " exchange store courier".split()
)


def until(check, timeout: float = 30.0):
    """check()'s first truthy value, polling (the gateway exports in the background)."""
    deadline = time.monotonic() + timeout
    while not (value := check()) and time.monotonic() < deadline:
        time.sleep(0.3)
    return value


def run(stack: LocalStack) -> None:
    key = stack.keys["RETAILER_KEY"]
    client = openai.OpenAI(base_url=f"{stack.url}/v1", api_key=key)
    api = httpx.Client(base_url=stack.url, headers={"Authorization": f"Bearer {key}"}, timeout=60)
    admin = {"Authorization": f"Bearer {stack.admin_key}"}

    print(f"\nModels the retailer tenant sees: {[m.id for m in client.models.list()]}")
    reply = client.completions.create(model="retailer-support", prompt=PROMPT, max_tokens=24)
    served = reply.model_extra["loraplex"]
    print(f"1. Completion from {served['adapter']['name']} v{served['adapter']['version']}:")
    print(f"   {reply.choices[0].text.strip()!r}")

    # 2. A second adapter to compare with (the airline demo adapter's weights stand in for a
    #    retrained one), and an experiment between the two, rated by reviewers.
    files = [("files", (p.name, p.read_bytes())) for p in sorted((ADAPTERS / "airline").iterdir())]
    httpx.post(
        f"{stack.url}/admin/tenants/retailer/adapters",
        data={"name": "support-b"},
        files=files,
        headers=admin,
        timeout=60,
    ).raise_for_status()
    experiment = {
        "key": "support-b-test",
        "variants": [
            {"name": "control", "traffic_weight": 0.5, "adapters": [{"name": "retailer-support"}]},
            {"name": "treatment", "traffic_weight": 0.5, "adapters": [{"name": "support-b"}]},
        ],
        "primary_metric": {"name": "rating", "kind": "METRIC_KIND_MEAN"},  # higher is better
    }
    api.post("/ab-testing/experiments", json=experiment).raise_for_status()
    api.patch(
        "/ab-testing/experiments/support-b-test", json={"action": "EXPERIMENT_ACTION_START"}
    ).raise_for_status()
    print("2. Experiment 'support-b-test' started: retailer-support vs support-b")
    users = ["alice", "bob", "carol", "dave", "erin", "frank", "alice"]  # alice comes back
    for user in users:
        reply = client.completions.create(
            model="experiment:support-b-test", user=user, prompt=PROMPT, max_tokens=16
        )
        routed = reply.model_extra["loraplex"]
        print(
            f"   {user:<6} -> {routed['experiment']['variant']:<9} "
            f"({routed['adapter']['name']}): {reply.choices[0].text.strip()[:50]!r}"
        )

    print("3. Streaming a completion: ", end="", flush=True)
    stream = client.completions.create(
        model="retailer-support",
        prompt="Customer: Can I return shoes that are too small?\nAgent:",
        max_tokens=24,
        stream=True,
    )
    for chunk in stream:
        print(chunk.choices[0].text, end="", flush=True)
    print()

    # 4. Every completion was queued for feedback, most uncertain first. A stand-in reviewer
    #    rates each reply 4 when it talks about the shop's business, else 2.
    completions = 1 + len(users) + 1
    until(lambda: api.get("/feedback/stats").json()["queued"] >= completions)
    print(f"4. Feedback queue: {api.get('/feedback/stats').json()['queued']} outputs waiting")
    rated = Counter()  # ratings per adapter
    while (lease := api.get("/feedback/next", params={"reviewer": "example"}).json())["item"]:
        item = lease["item"]
        words = {w.strip(".,!?:;'\"").lower() for w in item["output"].split()}
        rating = 4 if words & SHOP_WORDS else 2
        answer = {"item_id": item["id"], "reviewer": "example", "lease_id": lease["lease_id"]}
        api.post("/feedback", json=answer | {"rating": rating}).raise_for_status()
        rated[item["adapter"]["name"]] += 1
        source = item["adapter"]["name"] + (f" ({item['variant']})" if item["variant"] else "")
        print(f"   entropy {item['priority']:.2f}  {source:<28} rated {rating}: ", end="")
        print(repr(item["output"].strip()[:40]))

    # 5. Analytics and the experiment's results, once the ratings have reached them (the
    #    gateway and the feedback service send them in the background).
    def metrics() -> dict:
        return api.get("/analytics/adapters/retailer-support").json()["metrics"]

    def results() -> dict:
        return api.get("/ab-testing/experiments/support-b-test/results").json()

    def users_rated(results: dict) -> int:
        return sum(stats["units"] for stats in results["metrics"][0]["stats"])

    until(lambda: metrics()["rating_count"] >= rated["retailer-support"])
    until(lambda: users_rated(results()) == len(set(users)))
    m = metrics()
    print(
        f"5. Analytics for retailer-support: {m['requests']} requests, success rate "
        f"{m['success_rate']:.0%}, latency p50 {m['latency_p50_seconds'] * 1000:.0f} ms, "
        f"{m['tokens_per_second']:.1f} tokens/s, {m['rating_count']} ratings "
        f"(mean {m['rating_mean']:.1f})"
    )
    experiment = results()
    print(f"   Experiment users per variant: {experiment['units_per_variant']}")
    for stats in experiment["metrics"][0]["stats"]:  # the primary metric: a user's mean rating
        mean = stats["sum"] / stats["units"] if stats["units"] else 0.0
        print(f"   {stats['variant']:<9} mean rating {mean:.2f} over {stats['units']} users")
    recommendation = experiment["recommendation"].removeprefix("RECOMMENDATION_").lower()
    print(f"   Recommendation: {recommendation} - {experiment['recommendation_reason']}")


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="loraplex-example-") as tmp:
        port = free_port()
        redis = start_redis_server(port, tmp)
        try:
            print("Starting the stack on free ports (about half a minute)...")
            stack = start_on_free_ports(
                Path(tmp), f"redis://127.0.0.1:{port}/0", {"LOG_LEVEL": "warning"}
            )
            print(f"Gateway at {stack.url}")
            try:
                run(stack)
            finally:
                print("Stopping the stack...")
                stack.stop()
        finally:
            redis.terminate()
            redis.wait()
    print("Done.")


if __name__ == "__main__":
    main()
