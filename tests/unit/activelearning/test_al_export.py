"""TRL dataset export: which feedback becomes which row, the exact JSONL schema, and that
`datasets.load_dataset("json", ...)` (what TRL's trainers read) loads each format."""

from __future__ import annotations

import json

import pytest

from services.activelearning.export import FIELDS, DatasetFormat, parse_format, rows, to_jsonl
from services.common.errors import InvalidArgument


def rec(item, kind, prompt="P1", output="O1", **kw):
    return {"item": item, "kind": kind, "prompt": prompt, "output": output, **kw}


RECORDS = [
    rec("a", "rating", rating=5),
    rec("a", "rating", rating=4),  # second review of a: mean 4.5
    rec("b", "rating", output="O2", rating=2),
    rec("c", "thumbs", prompt="P2", output="O3", thumbs_up=True),
    rec("d", "thumbs", prompt="P2", output="O4", thumbs_up=False),
    rec("e", "corrected_text", prompt="P3", output="Ünïcode wrong", corrected_text="right ✓"),
    rec("f", "pairwise", prompt="P4", output="O5", other_output="O6", preferred="other"),
    rec("g", "rating", prompt="P5", output="O7", rating=3),
]


def parse(jsonl: bytes) -> list[dict]:
    text = jsonl.decode("utf-8")
    assert text.endswith("\n") and "\n\n" not in text
    return [json.loads(line) for line in text.splitlines()]


def check_schema(lines: list[dict], fmt: DatasetFormat) -> None:
    types = {"prompt": str, "completion": str, "chosen": str, "rejected": str, "label": bool}
    for line in lines:
        assert tuple(sorted(line)) == tuple(sorted(FIELDS[fmt]))
        for name, value in line.items():
            assert type(value) is types[name]


def test_sft_rows():
    lines = parse(to_jsonl(rows(RECORDS, DatasetFormat.SFT)))
    check_schema(lines, DatasetFormat.SFT)
    assert lines == [
        {"prompt": "P1", "completion": "O1"},  # mean rating 4.5, once despite two reviews
        {"prompt": "P2", "completion": "O3"},  # thumbs up
        {"prompt": "P3", "completion": "right ✓"},  # the correction
    ]


def test_dpo_rows():
    lines = parse(to_jsonl(rows(RECORDS, DatasetFormat.DPO)))
    check_schema(lines, DatasetFormat.DPO)
    assert lines == [
        {"prompt": "P4", "chosen": "O6", "rejected": "O5"},  # pairwise preference
        {"prompt": "P3", "chosen": "right ✓", "rejected": "Ünïcode wrong"},  # correction
        {"prompt": "P1", "chosen": "O1", "rejected": "O2"},  # rating pair 4.5 > 2
    ]


def test_kto_rows():
    lines = parse(to_jsonl(rows(RECORDS, DatasetFormat.KTO)))
    check_schema(lines, DatasetFormat.KTO)
    assert lines == [
        {"prompt": "P1", "completion": "O1", "label": True},
        {"prompt": "P1", "completion": "O2", "label": False},
        {"prompt": "P2", "completion": "O3", "label": True},
        {"prompt": "P2", "completion": "O4", "label": False},
        {"prompt": "P3", "completion": "right ✓", "label": True},
        {"prompt": "P3", "completion": "Ünïcode wrong", "label": False},
    ]  # the 3-star output is neither good nor bad


def test_thumbs_tie_is_no_verdict_and_no_feedback_is_an_empty_file():
    tie = [rec("a", "thumbs", thumbs_up=True), rec("a", "thumbs", thumbs_up=False)]
    assert list(rows(tie, DatasetFormat.KTO)) == []
    assert to_jsonl(rows([], DatasetFormat.SFT)) == b""


def test_unknown_format():
    assert parse_format("dpo") is DatasetFormat.DPO
    with pytest.raises(InvalidArgument) as err:
        parse_format("csv")
    assert err.value.reason == "UNKNOWN_FORMAT"


@pytest.mark.parametrize("fmt", list(DatasetFormat))
def test_datasets_loads_each_format_with_its_columns(fmt, tmp_path):
    import datasets  # a dev dependency; imported here since it is slow to import

    path = tmp_path / f"{fmt.name.lower()}.jsonl"
    path.write_bytes(to_jsonl(rows(RECORDS, fmt)))
    loaded = datasets.load_dataset(
        "json", data_files=str(path), split="train", cache_dir=str(tmp_path / "cache")
    )
    assert sorted(loaded.column_names) == sorted(FIELDS[fmt])
    assert [dict(r) for r in loaded] == parse(path.read_bytes())
