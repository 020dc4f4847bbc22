"""The OpenAI `model` field -> adapter reference."""

from __future__ import annotations

import pytest

from gateway.openai_schemas import parse_model
from services.common.errors import InvalidArgument

BASE = "tiny-base"


@pytest.mark.parametrize(
    ("model", "name", "version"),
    [
        (BASE, "", 0),  # the base model: no adapter
        ("fraud", "fraud", 0),  # an adapter's current version
        ("fraud@3", "fraud", 3),
        ("fraud@0", "fraud", 0),
        ("fraud.v2@12", "fraud.v2", 12),
        ("fraud@latest", "fraud@latest", 0),  # not a version: the service judges the name
        ("fraud@", "fraud@", 0),
        (f"{BASE}@2", f"{BASE}", 2),  # an adapter that happens to share the base's name
    ],
)
def test_parse_model(model: str, name: str, version: int) -> None:
    ref = parse_model(model, BASE)
    assert (ref.name, ref.version) == (name, version)


def test_base_model_id_containing_at_sign_is_still_the_base_model() -> None:
    ref = parse_model("org/model@7", "org/model@7")
    assert (ref.name, ref.version) == ("", 0)


def test_version_beyond_uint32_is_invalid() -> None:
    with pytest.raises(InvalidArgument):
        parse_model("fraud@4294967296", BASE)
    assert parse_model("fraud@4294967295", BASE).version == 4294967295
