"""Deterministic generator for the demo corpora.

``python -m models.corpus`` (re)writes ``models/data/<tenant>/{train,heldout}.txt``. Dialogues are
separated by a blank line and use the serving chat format::

    System: ...        (optional)
    Customer: ...
    Agent: ...

The general corpus used for pre-training is generated in memory by ``models.build_base``.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from pathlib import Path

from models import templates as T

DATA_DIR = Path(__file__).parent / "data"
TENANT_NAMES = ("retailer", "bank", "airline")
# Different seeds per split => different slot draws (and template picks) for held-out text.
SPLIT_SEEDS = {"train": 1, "heldout": 2, "base": 3}
SPLIT_SIZES = {"train": 1500, "heldout": 200}  # dialogues per tenant written to disk

_CHOICE = re.compile(r"\[([^\[\]]*)\]")
_SLOT = re.compile(r"\{(\w+)\}")


_ALNUM = ("ABCDEFGHJKLMNPQRSTUVWXYZ", "0123456789")


def _money(rng: random.Random, lo: int, hi: int) -> str:
    return f"{rng.randint(lo, hi):,}.{rng.choice(['00', '50', '99', str(rng.randint(10, 98))])}"


# Generated (non-list) slots; list-valued slots come from the templates module.
_DYNAMIC: dict[str, Callable[[random.Random], str]] = {
    "order": lambda r: str(r.randint(1000, 99999)),
    "tracking": lambda r: "TRK" + "".join(r.choice("0123456789") for _ in range(8)),
    "n": lambda r: str(r.randint(2, 5)),
    "m": lambda r: str(r.randint(6, 10)),
    "window": lambda r: r.choice(["14", "30", "30", "60"]),
    "k": lambda r: str(r.randint(1, 9)),
    "k2": lambda r: str(r.randint(0, 9)),
    "k3": lambda r: str(r.randint(0, 9)),
    "price": lambda r: _money(r, 15, 250),
    "small": lambda r: _money(r, 5, 75),
    "amount": lambda r: _money(r, 100, 9999),
    "limit": lambda r: f"{r.randint(2, 50) * 500:,}",
    "miles": lambda r: f"{r.randint(3, 90) * 1000:,}",
    "last4": lambda r: "".join(r.choice("0123456789") for _ in range(4)),
    "date": lambda r: str(r.randint(1, 28)),
    "phone": lambda r: f"555 {r.randint(0, 9999):04d}",
    "room": lambda r: str(r.randint(101, 599)),
    "pin": lambda r: f"{r.randint(0, 9999):04d}",
    "ref": lambda r: "".join(r.choice(_ALNUM[0]) for _ in range(2)) + str(r.randint(1000, 99999)),
    "clock": lambda r: f"{r.randint(1, 12)}:{r.randrange(0, 60, 5):02d} {r.choice(['am', 'pm'])}",
    "flight": lambda r: f"SK {r.randint(10, 2999)}",
    "booking": lambda r: "".join(r.choice(_ALNUM[i % 2]) for i in (0, 0, 1, 0, 1, 0)),
    "seat": lambda r: f"{r.randint(1, 34)}{r.choice('ABCDEF')}",
    "row": lambda r: str(r.randint(1, 34)),
    "gate": lambda r: f"{r.choice('ABCDE')}{r.randint(1, 40)}",
}
_SHARED = {
    "name": T.NAMES,
    "day": T.DAYS,
    "month": T.MONTHS,
    "city": T.CITIES,
    "color": T.COLORS,
}


class Slots(dict):
    """Slot values for one document: drawn lazily on first use, then fixed."""

    def __init__(self, rng: random.Random, tables: dict[str, list[str]], **fixed: str) -> None:
        super().__init__(fixed)
        self.rng, self.tables = rng, tables

    def __missing__(self, key: str) -> str:
        if key in _DYNAMIC:
            value = _DYNAMIC[key](self.rng)
        elif key in self.tables:
            value = self.rng.choice(self.tables[key])
        elif key[-1] in "23" and key[:-1] in self.tables:
            # "city2" etc.: a second value that differs from "city".
            first = self[key[:-1]]
            value = self.rng.choice([v for v in self.tables[key[:-1]] if v != first])
        else:
            raise KeyError(key)
        value = render(value, self)  # slot values may contain templates themselves
        self[key] = value
        return value


def render(template: str, slots: Slots) -> str:
    """Expand ``[a|b]`` choices (innermost first), then fill ``{slot}`` placeholders."""
    rng = slots.rng
    while (m := _CHOICE.search(template)) is not None:
        template = template[: m.start()] + rng.choice(m.group(1).split("|")) + template[m.end() :]
    return _SLOT.sub(lambda m: slots[m.group(1)], template)


def general_document(rng: random.Random) -> str:
    """One general document: a short paragraph, a two-person chat or a generic support chat."""
    slots = Slots(rng, {**_SHARED, **T.GENERAL_SLOTS})
    kind = rng.random()
    if kind < 0.5:
        sents = rng.sample(T.GENERAL_SENTENCES, rng.randint(2, 5))
        return " ".join(render(s, slots) for s in sents) + "\n"
    if kind < 0.8:
        a, b = slots["name"], slots["name2"]
        lines = rng.choice(T.GENERAL_DIALOGUES)
        return "".join(f"{(a, b)[i % 2]}: {render(s, slots)}\n" for i, s in enumerate(lines))
    cust, agent = rng.choice(T.GENERAL_SUPPORT)
    return f"Customer: {render(cust, slots)}\nAgent: {render(agent, slots)}\n"


def _turn(turn: T.Turn, slots: Slots) -> str:
    customer, agent = slots.rng.choice(turn)
    return (
        f"Customer: {render(slots.rng.choice(customer), slots)}\n"
        f"Agent: {render(slots.rng.choice(agent), slots)}\n"
    )


def tenant_dialogue(tenant: str, rng: random.Random) -> str:
    """One customer-support dialogue for ``tenant`` (1-3 intents plus optional small talk)."""
    spec = T.TENANTS[tenant]
    slots = Slots(rng, {**_SHARED, **spec["slots"]}, brand=spec["brand"])
    out = []
    if rng.random() < 0.3:
        out.append(f"System: {render(rng.choice(spec['system']), slots)}\n")
    if rng.random() < 0.25:
        out.append(_turn(T.OPENER, slots))
    intents = rng.sample(spec["intents"], 2 if rng.random() < 0.2 else 1)
    if rng.random() < 0.15:
        # A chain: the agent asks for a detail (order number, ...) that the next turn supplies.
        intents[0] = rng.choice(spec["chains"])
        out.extend(_turn(turn, slots) for turn in intents.pop(0))
    for intent in intents:
        out.append(_turn(intent[0], slots))
        for follow_up in intent[1:]:
            if rng.random() < 0.5:
                out.append(_turn(follow_up, slots))
    if rng.random() < 0.35:
        out.append(_turn(T.CLOSER, slots))
    return "".join(out)


def tenant_dialogues(tenant: str, split: str, count: int) -> list[str]:
    # Seed mixes split and tenant so splits never share a random stream.
    rng = random.Random(SPLIT_SEEDS[split] * 1000 + TENANT_NAMES.index(tenant))
    return [tenant_dialogue(tenant, rng) for _ in range(count)]


def general_documents(count: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [general_document(rng) for _ in range(count)]


def read_split(tenant: str, split: str) -> list[str]:
    """Dialogues of a written split (blank-line separated)."""
    text = (DATA_DIR / tenant / f"{split}.txt").read_text(encoding="utf-8")
    return [d.strip("\n") + "\n" for d in text.split("\n\n") if d.strip()]


def write_splits() -> None:
    for tenant in TENANT_NAMES:
        (DATA_DIR / tenant).mkdir(parents=True, exist_ok=True)
        for split, count in SPLIT_SIZES.items():
            docs = tenant_dialogues(tenant, split, count)
            (DATA_DIR / tenant / f"{split}.txt").write_text("\n".join(docs), encoding="utf-8")


if __name__ == "__main__":
    write_splits()
    for path in sorted(DATA_DIR.glob("*/*.txt")):
        print(f"{path.relative_to(DATA_DIR.parent)}: {path.stat().st_size / 1e3:.0f} kB")
