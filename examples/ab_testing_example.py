"""A/B testing: which of two adapters should a shop's support bot use?

An online shop has two candidate adapters: "support-a" (the airline demo adapter) and
"support-b" (the retailer demo adapter). The example creates an experiment between them,
assigns users to a variant (deterministically: the same user always gets the same one),
lets each user ask a shop question answered by their variant's adapter, records whether the
real reply stayed on topic (it talks about orders, delivery, returns...), and prints the
results with the framework's recommendation.

    .venv/bin/python examples/ab_testing_example.py

Uses Redis at REDIS_URL when it is set, else starts an embedded redis-server of its own.
"""

import asyncio
import os
import uuid
from pathlib import Path

from services import get_ab_framework, get_compositor
from services.common.redis import EmbeddedRedis

ADAPTERS = Path(__file__).resolve().parent.parent / "models" / "adapters"
TENANT = f"example-ab-{uuid.uuid4().hex[:6]}"  # a fresh tenant per run
EXPERIMENT = "support-adapter"
USERS = [f"user-{i}" for i in range(40)]
QUESTIONS = [
    "Where is my order 4821?",
    "The shoes I got are too small.",
    "My package never arrived.",
    "Can I return the jacket I bought?",
]
SHOP_WORDS = set(
    "order ship shipped deliver delivery return refund package parcel tracking item size"
    " exchange store courier".split()
)


def on_topic(reply: str) -> bool:
    return bool({w.strip(".,!?:;'\"").lower() for w in reply.split()} & SHOP_WORDS)


async def main() -> None:
    redis_url = os.environ.get("REDIS_URL")
    embedded = None if redis_url else EmbeddedRedis()
    redis_url = redis_url or embedded.url
    ab = get_ab_framework(redis_url)
    try:
        print("Loading the base model...")
        async with get_compositor(redis_url) as compositor:
            # A variant names registered adapters, so register them first.
            await compositor.register(TENANT, "support-a", ADAPTERS / "airline")
            await compositor.register(TENANT, "support-b", ADAPTERS / "retailer")
            await ab.create_experiment(
                TENANT,
                EXPERIMENT,
                [
                    {"name": "control", "adapters": ["support-a"], "traffic_weight": 0.5},
                    {"name": "treatment", "adapters": ["support-b"], "traffic_weight": 0.5},
                ],
                primary_metric={"name": "on_topic", "kind": "rate", "goal": "increase"},
                minimum_detectable_effect=0.5,  # only a large improvement is worth a switch
                start=True,
            )
            print(f"Experiment {EXPERIMENT!r} running: control=support-a, treatment=support-b")

            # The bucket is a hash of (experiment, user): the same on every replica and run.
            assigned = {user: await ab.assign(TENANT, EXPERIMENT, user) for user in USERS}
            for user in USERS[:4]:
                print(f"  {user} -> {assigned[user].variant.name} (bucket {assigned[user].bucket})")
            again = {user: await ab.assign(TENANT, EXPERIMENT, user) for user in USERS[:4]}
            same = all(a.variant == assigned[user].variant for user, a in again.items())
            sticky = [a.sticky for a in again.values()]
            print(f"Assigned again: same variants={same}, sticky={sticky}")

            async def ask(user: str, question: str) -> str:
                reply = await compositor.generate(
                    TENANT,
                    f"Customer: {question}\nAgent:",
                    adapter=assigned[user].variant.adapters[0].name,
                    max_new_tokens=16,
                    seed=USERS.index(user),
                )
                return reply.generation.text.strip()

            print(f"\n{len(USERS)} users each ask one question (their requests are batched)...")
            questions = [QUESTIONS[i % len(QUESTIONS)] for i in range(len(USERS))]
            replies = await asyncio.gather(*map(ask, USERS, questions))
        for user, question, reply in zip(USERS, questions, replies, strict=True):
            await ab.record_outcome(TENANT, EXPERIMENT, user, "on_topic", on_topic(reply))
            if user in USERS[:2]:
                print(f"  {user} ({assigned[user].variant.name}) asked {question!r}")
                print(f"    reply {reply!r} -> on topic: {on_topic(reply)}")

        results = await ab.get_results(TENANT, EXPERIMENT)
        print(f"\nResults (users per variant: {results.units_per_variant}):")
        metric = results.metrics[0]  # the primary metric
        print(f"  control: {metric.aggregates[0].mean:.0%} of replies on topic")
        for c in metric.comparisons:
            v = c.comparison
            low, high = v.relative_ci
            print(f"  {c.variant}: {v.variant_mean:.0%} of replies on topic")
            print(f"    lift {v.relative_lift:+.0%} (95% CI {low:+.0%} to {high:+.0%})")
            print(f"    p-value {v.p_value:.2g}, always-valid p-value {c.sequential.p_value:.2g}")
            print(f"    chance to beat control {c.bayesian.chance_to_beat_control:.1%}")
            print(f"    significant: {c.significant}")
        print(f"Recommendation: {results.recommendation.value} - {results.reason}")
    finally:
        await ab.close()
        if embedded is not None:
            embedded.close()
    print("\nDone.")


if __name__ == "__main__":
    asyncio.run(main())
