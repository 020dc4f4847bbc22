"""docs/api.md's compatibility table stays true: it lists every request field of OpenAI's
completions, chat and embeddings schemas (from the installed openai package), and marks a
field "no" for loraplex exactly when no gateway request model for its endpoints declares it."""

from __future__ import annotations

import re

from services.common.settings import REPO_ROOT
from tests.openai_request_fields import ENDPOINTS, honoured, openai_fields

ENDPOINT_NAMES = {
    "completions": "/v1/completions",
    "chat": "/v1/chat/completions",
    "embeddings": "/v1/embeddings",
}


def table_rows() -> dict[str, tuple[list[str], str]]:
    """field -> (the endpoints its row names, its loraplex cell)."""
    text = (REPO_ROOT / "docs" / "api.md").read_text()
    section = text.split("## Compatibility with OpenAI, vLLM and LoRAX", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 5 or not cells[0].startswith("`"):
            continue
        names = cells[1].split(", ")
        paths = list(ENDPOINTS) if names == ["all"] else [ENDPOINT_NAMES.get(n, n) for n in names]
        for field in re.findall(r"`(\w+)`", cells[0]):
            rows[field] = (paths, cells[2])
    return rows


def test_every_openai_request_field_has_a_row_naming_its_endpoints() -> None:
    rows = table_rows()
    for path in ENDPOINTS:
        for field in openai_fields(path):
            assert field in rows, f"docs/api.md: add {field} to the compatibility table"
            assert path in rows[field][0], f"docs/api.md: {field}'s row should name {path}"


def test_the_loraplex_column_says_no_exactly_for_fields_the_gateway_does_not_declare() -> None:
    for field, (paths, cell) in table_rows().items():
        declared = any(field in honoured(path) for path in paths if path in ENDPOINTS)
        assert cell.startswith("no") != declared, (field, cell)
