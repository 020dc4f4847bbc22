"""Active learning: pick the model outputs most worth a human reviewer's time.

Generates real replies with the demo adapters (sampled, so they vary), scores every reply by
how uncertain the model was while writing it (per-token entropies and log-probabilities
that come back with each generation), and selects the most uncertain ones for feedback:
first with select_for_feedback(), then with an ActiveLearningSelector that ranks by another
method and spreads its picks over different prompts.

    .venv/bin/python examples/active_learning_example.py

Uses Redis at REDIS_URL when it is set, else starts an embedded redis-server of its own.
"""

import asyncio
from pathlib import Path

from services import ActiveLearningSelector, UncertaintyMethod, get_compositor, select_for_feedback

ADAPTERS = Path(__file__).resolve().parent.parent / "models" / "adapters"
TENANT = "example-active-learning"
PROMPTS = {
    "retailer-support": [
        "Customer: Where is my order 4821?\nAgent:",
        "Customer: The blender I bought is broken, smoke came out.\nAgent:",
    ],
    "bank-support": [
        "Customer: I lost my card yesterday.\nAgent:",
        "Customer: Why was I charged a fee on my savings account?\nAgent:",
    ],
    "airline-support": [
        "Customer: My flight was delayed, what are my options?\nAgent:",
        "Customer: Can my cat travel with me in the cabin?\nAgent:",
    ],
}
SAMPLES_PER_PROMPT = 2


async def generate_candidates() -> list[dict]:
    print("Loading the base model and generating replies (temperature 1.0)...")
    async with get_compositor() as compositor:
        for adapter in PROMPTS:
            await compositor.register(TENANT, adapter, ADAPTERS / adapter.removesuffix("-support"))
        asks = [
            (adapter, prompt, seed)
            for adapter, prompts in PROMPTS.items()
            for prompt in prompts
            for seed in range(SAMPLES_PER_PROMPT)
        ]
        replies = await asyncio.gather(  # concurrent requests are decoded in one batch
            *(
                compositor.generate(
                    TENANT, prompt, adapter=adapter, max_new_tokens=24, temperature=1.0, seed=seed
                )
                for adapter, prompt, seed in asks
            )
        )
    return [
        {
            "id": f"out-{i}",
            "adapter": adapter,
            "prompt": prompt,
            "output": reply.generation.text,
            "token_logprobs": reply.generation.token_logprobs,
            "token_entropies": reply.generation.token_entropies,
        }
        for i, ((adapter, prompt, _), reply) in enumerate(zip(asks, replies, strict=True))
    ]


def show(title: str, selection) -> None:
    print(f"\n{title}, by {selection.method.value}:")
    for example in selection:
        question = example.prompt.removeprefix("Customer: ").split("\n")[0]
        print(f"  #{example.priority}  score {example.score:.3f}  [{example.adapter}] {question}")
        print(f"      reply: {example.model_output.strip()!r}")


async def main() -> None:
    candidates = await generate_candidates()
    print(f"Generated {len(candidates)} replies; mean token entropy of each:")
    for c in candidates:
        entropy = sum(c["token_entropies"]) / max(len(c["token_entropies"]), 1)
        print(f"  {c['id']:<7} {entropy:.3f}  {c['output'].strip()[:60]!r}")

    top = select_for_feedback(candidates, method="entropy", batch_size=3)
    show("The 3 most uncertain replies, for a reviewer", top)

    selector = ActiveLearningSelector(UncertaintyMethod.MARGIN, strategy="hybrid")
    spread = selector.select_uncertain_examples(candidates, batch_size=3)
    show("3 uncertain replies unlike each other (hybrid strategy)", spread)
    print(f"  (skipped as near-duplicates of a picked reply: {spread.near_duplicates})")
    print("\nDone.")


if __name__ == "__main__":
    asyncio.run(main())
