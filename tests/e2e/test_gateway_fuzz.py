"""Property-based fuzzing of the gateway against its own OpenAPI document, over the real
stack: whatever schemathesis sends, no server error (5xx other than a documented outage)
and no status the document does not state. Bounded: a few derandomized examples per
operation, generation capped by the fuzz tenant's max_tokens ceiling. A mutation check: take 400 out
of the documented statuses (gateway/errors.py) and this test fails."""

from __future__ import annotations

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import status_code_conformance

pytestmark = pytest.mark.e2e

FUZZ_TENANT = "fuzz"


@pytest.fixture(scope="module")
def fuzz_keys(stack) -> dict[str, str]:
    """A tenant of its own (the demo tenants serve the other tests), its generations
    capped at 16 tokens (the completions default) so that fuzzing stays quick."""
    admin = httpx.Client(
        base_url=stack.url, headers={"Authorization": f"Bearer {stack.admin_key}"}, timeout=60
    )
    assert admin.post("/admin/tenants", json={"tenant": FUZZ_TENANT}).status_code in (201, 409)
    key = admin.post(f"/admin/tenants/{FUZZ_TENANT}/keys").json()["api_key"]
    limits = admin.put(f"/admin/tenants/{FUZZ_TENANT}/limits", json={"max_tokens_per_request": 16})
    assert limits.status_code == 200
    return {"tenant": key, "admin": stack.admin_key}


def fuzzer(operation, headers: dict[str, str]):
    """A hypothesis test of one operation: a few derandomized cases, each checked."""

    @given(case=operation.as_strategy())
    @settings(
        max_examples=6,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    def fuzz(case) -> None:
        case.call_and_validate(
            headers=headers, checks=[not_a_server_error, status_code_conformance], timeout=60
        )

    return fuzz


def test_no_server_errors_and_only_documented_statuses(stack, fuzz_keys) -> None:
    schema = schemathesis.openapi.from_url(f"{stack.url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) > 30  # the whole API, not an empty document
    failures: dict[str, str] = {}
    for operation in operations:
        key = fuzz_keys["admin"] if operation.path.startswith("/admin") else fuzz_keys["tenant"]
        try:
            fuzzer(operation, {"Authorization": f"Bearer {key}"})()
        except (Exception, BaseExceptionGroup) as err:  # one report per failing operation
            failures[operation.label] = str(err)[:2000]
    assert not failures, "\n\n".join(f"{op}:\n{text}" for op, text in failures.items())
