"""Feedback records -> the dataset formats TRL trains on, as JSON Lines.

TRL's "prompt-completion" (SFT), "preference" (DPO) and "unpaired preference" (KTO) formats,
standard (not conversational) text fields, one JSON object per line with exactly the
format's fields, which `datasets.load_dataset("json", data_files=...)` reads as a table:

    sft  {"prompt": str, "completion": str}
    dpo  {"prompt": str, "chosen": str, "rejected": str}
    kto  {"prompt": str, "completion": str, "label": bool}

An item reviewed several times counts once: its ratings are averaged and its thumbs decided
by majority (a tie counts as neither).
"""

from __future__ import annotations

import enum
import itertools
import json
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from services.activelearning.scores import parse_choice

GOOD_RATING = 4  # ratings >= this are a good output (SFT, KTO true)
BAD_RATING = 2  # ratings <= this are a bad output (KTO false)


class DatasetFormat(enum.StrEnum):
    SFT = "sft"
    DPO = "dpo"
    KTO = "kto"


FIELDS = {
    DatasetFormat.SFT: ("prompt", "completion"),
    DatasetFormat.DPO: ("prompt", "chosen", "rejected"),
    DatasetFormat.KTO: ("prompt", "completion", "label"),
}


def parse_format(value: DatasetFormat | str) -> DatasetFormat:
    return parse_choice(DatasetFormat, value, "dataset format", "UNKNOWN_FORMAT")


@dataclass
class _Item:
    prompt: str
    output: str
    ratings: list[float] = field(default_factory=list)
    thumbs: list[bool] = field(default_factory=list)
    corrections: list[str] = field(default_factory=list)

    @property
    def mean_rating(self) -> float | None:
        return sum(self.ratings) / len(self.ratings) if self.ratings else None

    @property
    def thumbs_verdict(self) -> bool | None:
        up = sum(self.thumbs)
        down = len(self.thumbs) - up
        return None if up == down else up > down


def rows(records: Iterable[dict[str, Any]], fmt: DatasetFormat) -> Iterator[dict[str, Any]]:
    """Dataset rows from feedback records (services.activelearning.queue's JSON form),
    oldest feedback first; duplicates of a row are left out."""
    items: dict[str, _Item] = {}
    pairs: list[tuple[str, str, str]] = []  # (prompt, chosen, rejected)
    for r in records:
        item = items.get(r["item"])
        if item is None:
            item = items[r["item"]] = _Item(r["prompt"], r["output"])
        kind = r["kind"]
        if kind == "rating":
            item.ratings.append(float(r["rating"]))
        elif kind == "thumbs":
            item.thumbs.append(bool(r["thumbs_up"]))
        elif kind == "corrected_text":
            item.corrections.append(r["corrected_text"])
        elif kind == "pairwise":
            other = r["other_output"]
            if r["preferred"] == "this":
                pairs.append((r["prompt"], r["output"], other))
            else:
                pairs.append((r["prompt"], other, r["output"]))

    out: list[dict[str, Any]] = []
    if fmt is DatasetFormat.SFT:
        for it in items.values():
            out += [{"prompt": it.prompt, "completion": c} for c in it.corrections]
            rating = it.mean_rating
            if (rating is not None and rating >= GOOD_RATING) or it.thumbs_verdict is True:
                out.append({"prompt": it.prompt, "completion": it.output})
    elif fmt is DatasetFormat.KTO:
        for it in items.values():
            for c in it.corrections:
                out.append({"prompt": it.prompt, "completion": c, "label": True})
            label = it.thumbs_verdict
            rating = it.mean_rating
            if label is None and rating is not None:
                label = True if rating >= GOOD_RATING else False if rating <= BAD_RATING else None
            if label is None and it.corrections:
                label = False  # a reviewer rewrote it
            if label is not None:
                out.append({"prompt": it.prompt, "completion": it.output, "label": label})
    else:
        for prompt, chosen, rejected in pairs:
            out.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
        by_prompt: dict[str, list[_Item]] = defaultdict(list)
        for it in items.values():
            for c in it.corrections:
                if c != it.output:
                    out.append({"prompt": it.prompt, "chosen": c, "rejected": it.output})
            if it.ratings:
                by_prompt[it.prompt].append(it)
        for prompt, rated in by_prompt.items():
            for a, b in itertools.combinations(rated, 2):
                ra, rb = a.mean_rating, b.mean_rating
                if ra != rb and a.output != b.output:
                    hi, lo = (a, b) if ra > rb else (b, a)  # type: ignore[operator]
                    out.append({"prompt": prompt, "chosen": hi.output, "rejected": lo.output})
    seen: set[str] = set()
    for row in out:
        line = json.dumps(row, ensure_ascii=False, sort_keys=True)
        if line not in seen:
            seen.add(line)
            yield row


def to_jsonl(rows_: Iterable[dict[str, Any]]) -> bytes:
    return b"".join(json.dumps(r, ensure_ascii=False).encode() + b"\n" for r in rows_)
