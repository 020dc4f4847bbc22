"""Training data: JSON Lines in TRL's standard formats, checked, split and fingerprinted.

    sft  {"prompt": str, "completion": str}   (prompt-completion; loss on the completion)
         {"text": str}                        (language modeling)
         {"messages": [{"role", "content"}]}  (conversational; the model's chat template)
    dpo  {"prompt": str, "chosen": str, "rejected": str}

Every row of a dataset has the same form. The held-out split is drawn with the job's seed
(by each row's sha256, so it does not depend on the order rows arrive in), and the
fingerprint is the sha256 of both splits' canonical JSON Lines.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from typing import Any

from services.common.errors import InvalidArgument
from services.training.params import Method

FORMS: dict[Method, tuple[frozenset[str], ...]] = {
    Method.SFT: (
        frozenset({"prompt", "completion"}),
        frozenset({"text"}),
        frozenset({"messages"}),
    ),
    Method.DPO: (frozenset({"prompt", "chosen", "rejected"}),),
}
_ROLES = {"system", "user", "assistant"}


def _canonical(row: dict[str, Any]) -> str:
    return json.dumps(row, ensure_ascii=False, sort_keys=True, separators=(",", ":"))


def _check_row(row: Any, line: int, method: Method) -> frozenset[str]:
    if not isinstance(row, dict):
        raise InvalidArgument(f"line {line}: not a JSON object", reason="BAD_DATASET", line=line)
    keys = frozenset(row)
    if keys not in FORMS[method]:
        if method is Method.DPO and "chosen" not in keys:
            raise InvalidArgument(
                f"line {line}: DPO needs preference pairs: prompt, chosen and rejected",
                reason="DPO_WITHOUT_PAIRS",
                line=line,
            )
        forms = " or ".join("/".join(sorted(f)) for f in FORMS[method])
        raise InvalidArgument(
            f"line {line}: fields {sorted(keys)} are not a {method} row ({forms})",
            reason="BAD_DATASET",
            line=line,
        )
    if "messages" in keys:
        messages = row["messages"]
        ok = (
            isinstance(messages, list)
            and messages
            and all(
                isinstance(m, dict)
                and set(m) == {"role", "content"}
                and m["role"] in _ROLES
                and isinstance(m["content"], str)
                for m in messages
            )
        )
        if not ok:
            raise InvalidArgument(
                f"line {line}: messages must be a list of {{role, content}}",
                reason="BAD_DATASET",
                line=line,
            )
    elif not all(isinstance(row[k], str) and row[k] for k in keys):
        raise InvalidArgument(
            f"line {line}: every field must be a non-empty string", reason="BAD_DATASET", line=line
        )
    return keys


def parse_jsonl(data: bytes, method: Method, max_examples: int) -> list[dict[str, Any]]:
    """Rows of one form, in order; INVALID_ARGUMENT naming the first bad line."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise InvalidArgument("the dataset is not UTF-8", reason="BAD_DATASET") from err
    rows: list[dict[str, Any]] = []
    form: frozenset[str] | None = None
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as err:
            raise InvalidArgument(
                f"line {number}: not valid JSON", reason="BAD_DATASET", line=number
            ) from err
        keys = _check_row(row, number, method)
        if form is not None and keys != form:
            raise InvalidArgument(
                f"line {number}: mixes dataset forms ({sorted(keys)} after {sorted(form)})",
                reason="BAD_DATASET",
                line=number,
            )
        form = keys
        rows.append(row)
        if len(rows) > max_examples:
            raise InvalidArgument(f"more than {max_examples} examples", reason="DATASET_TOO_LARGE")
    if not rows:
        raise InvalidArgument("the dataset has no examples", reason="EMPTY_DATASET")
    return rows


@dataclass(frozen=True)
class Splits:
    train: list[dict[str, Any]]
    heldout: list[dict[str, Any]]

    @property
    def fingerprint(self) -> str:
        digest = hashlib.sha256()
        for name, rows in (("train", self.train), ("heldout", self.heldout)):
            digest.update(name.encode() + b"\n")
            for row in rows:
                digest.update(_canonical(row).encode() + b"\n")
        return digest.hexdigest()

    def to_json(self) -> bytes:
        return json.dumps({"train": self.train, "heldout": self.heldout}).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Splits:
        body = json.loads(data)
        return cls(body["train"], body["heldout"])


def split(
    rows: list[dict[str, Any]], fraction: float, seed: int, min_train: int, min_heldout: int
) -> Splits:
    """Identical rows count once. Rows are ordered by sha256 of their canonical JSON, then
    shuffled with `seed`; the first round(fraction * n) (at least min_heldout) are held out."""
    unique = {_canonical(r): r for r in rows}
    keyed = sorted(unique.items(), key=lambda kv: hashlib.sha256(kv[0].encode()).hexdigest())
    random.Random(seed).shuffle(keyed)
    n = len(keyed)
    n_heldout = max(min_heldout, round(fraction * n))
    if n - n_heldout < min_train:
        raise InvalidArgument(
            f"{n} distinct examples are too few: a held-out split of {n_heldout} needs at least "
            f"{n_heldout + min_train}",
            reason="TOO_FEW_EXAMPLES",
            examples=n,
            needed=n_heldout + min_train,
        )
    heldout = [r for _, r in keyed[:n_heldout]]
    train = [r for _, r in keyed[n_heldout:]]
    return Splits(train, heldout)
