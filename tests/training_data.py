"""Prompt/reference pairs from a demo tenant's held-out dialogs (models/data/<tenant>)."""

from __future__ import annotations

import itertools
import json

from models import corpus


def reference_pairs(tenant: str, count: int, skip: int = 0) -> list[dict[str, str]]:
    """(prompt, completion) pairs: 'Customer: <turn>\\nAgent:' and the agent's reply, one per
    customer turn, distinct prompts, in corpus order."""
    pairs: list[dict[str, str]] = []
    seen: set[str] = set()
    for doc in corpus.read_split(tenant, "heldout"):
        lines = doc.splitlines()
        for question, answer in itertools.pairwise(lines):
            if question.startswith("Customer: ") and answer.startswith("Agent: "):
                prompt = f"{question}\nAgent:"
                if prompt not in seen:
                    seen.add(prompt)
                    pairs.append({"prompt": prompt, "completion": answer.removeprefix("Agent:")})
    return pairs[skip : skip + count]


def to_jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)
