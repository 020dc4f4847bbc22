"""The console's only way to the platform: the gateway's HTTP API (docs/api.md).

One `Gateway` per signed-in session holds the API key (in memory, in that session only) and,
for the admin key, the tenant it acts for (the X-Loraplex-Tenant header). Every failure is an
`ApiError` with the gateway's message and reason, ready to show to a person.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import httpx

ACT_FOR_TENANT = "X-Loraplex-Tenant"


@dataclass(eq=False)
class ApiError(Exception):
    """A failed call: the HTTP status (0: the gateway did not answer), the gRPC-style status
    name, the message and the machine-readable reason of the gateway's error body."""

    status: int
    message: str
    code: str = ""
    reason: str = ""

    def __str__(self) -> str:
        where = f"HTTP {self.status}" if self.status else "no answer"
        why = ", ".join(part for part in (self.reason or self.code, where) if part)
        return f"{self.message} ({why})"

    @property
    def not_deployed(self) -> bool:
        """The route, or the service behind it, is not part of this deployment: a 404 that
        names no missing thing (no such route), or a 503."""
        return self.status == 503 or (self.status == 404 and not self.reason)


def _error(response: httpx.Response) -> ApiError:
    try:
        body = response.json().get("error", {})
    except ValueError:
        body = {}
    if not isinstance(body, dict):  # e.g. Starlette's {"detail": "Not Found"} for no route
        body = {}
    details = body.get("details") or [{}]
    return ApiError(
        status=response.status_code,
        message=body.get("message") or response.reason_phrase or "request failed",
        code=body.get("status", ""),
        reason=details[0].get("reason", "") if isinstance(details[0], dict) else "",
    )


def adapter_ref(name: str, version: int) -> str:
    """A candidate as the training routes name it: <adapter>@<version>."""
    return quote(f"{name}@{version}", safe="@")


class Gateway:
    def __init__(
        self,
        url: str,
        api_key: str,
        *,
        tenant: str = "",
        timeout: float = 60.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self.tenant = tenant
        self._key, self._timeout, self._transport = api_key, timeout, transport
        headers = {"Authorization": f"Bearer {api_key}"}
        if tenant:
            headers[ACT_FOR_TENANT] = tenant
        self._http = httpx.Client(
            base_url=self.url, headers=headers, timeout=timeout, transport=transport
        )

    def __repr__(self) -> str:  # never the key
        return f"Gateway({self.url!r}, tenant={self.tenant!r})"

    def acting_for(self, tenant: str) -> Gateway:
        """The same (admin) key acting for `tenant`: the admin's tenant picker."""
        return Gateway(
            self.url, self._key, tenant=tenant, timeout=self._timeout, transport=self._transport
        )

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TimeoutException:
            raise ApiError(0, f"the gateway at {self.url} did not answer in time") from None
        except httpx.HTTPError as err:
            raise ApiError(0, f"cannot reach the gateway at {self.url}: {err}") from None
        if response.status_code >= 400:
            raise _error(response)
        return response

    def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        return self.request(method, path, **kwargs).json()

    # who is signed in
    def whoami(self) -> dict[str, str]:
        return self._json("GET", "/whoami")

    def audit(self, limit: int = 100) -> list[dict]:
        """The audit log of the tenant this (admin) client acts for, newest first."""
        params = {"tenant": self.tenant, "limit": limit}
        return self._json("GET", "/admin/audit", params=params)["entries"]

    def tenants(self) -> list[str]:
        return [t["tenant"] for t in self._json("GET", "/admin/tenants")["tenants"]]

    # analytics
    def adapter_metrics(self, adapter: str, window: str, version: int | None = None) -> dict:
        params = {"window": window, **({"version": version} if version else {})}
        return self._json("GET", f"/analytics/adapters/{quote(adapter)}", params=params)

    def timeseries(self, adapter: str, window: str) -> dict:
        path = f"/analytics/adapters/{quote(adapter)}/timeseries"
        return self._json("GET", path, params={"window": window})

    def top_performers(self, metric: str, window: str, limit: int = 10) -> dict:
        params = {"metric": metric, "window": window, "limit": limit}
        return self._json("GET", "/analytics/top-performers", params=params)

    # A/B testing
    def experiments(self) -> list[dict]:
        reply = self._json("GET", "/ab-testing/experiments", params={"page_size": 1000})
        return reply.get("experiments", [])

    def create_experiment(self, experiment: dict) -> dict:
        return self._json("POST", "/ab-testing/experiments", json=experiment)

    def experiment_action(self, key: str, action: str) -> dict:
        body = {"action": f"EXPERIMENT_ACTION_{action.upper()}"}
        return self._json("PATCH", f"/ab-testing/experiments/{quote(key)}", json=body)

    def results(self, key: str) -> dict:
        return self._json("GET", f"/ab-testing/experiments/{quote(key)}/results")

    # review (RLHF)
    def feedback_stats(self) -> dict:
        return self._json("GET", "/feedback/stats")

    def next_item(self, reviewer: str) -> dict:
        return self._json("GET", "/feedback/next", params={"reviewer": reviewer})

    def submit_feedback(self, answer: dict) -> dict:
        return self._json("POST", "/feedback", json=answer)

    def export(self, format: str) -> bytes:
        return self.request("GET", "/feedback/export", params={"format": format}).content

    # composition
    def adapters(self) -> list[dict]:
        return self._json("GET", "/composition/adapters").get("adapters", [])

    def cache_stats(self) -> dict:
        return self._json("GET", "/composition/stats")

    def swap(self, adapter: str, version: int) -> dict:
        return self._json(
            "POST", "/composition/swap", json={"adapter": adapter, "version": version}
        )

    def rollback(self, adapter: str) -> dict:
        return self._json("POST", "/composition/rollback", json={"adapter": adapter})

    def complete(self, body: dict) -> dict:
        return self._json("POST", "/v1/completions", json=body)

    # training (issue 11's routes)
    def training_jobs(self) -> list[dict]:
        return self._json("GET", "/training/jobs", params={"page_size": 50}).get("jobs", [])

    def training_job(self, job_id: str) -> dict:
        return self._json("GET", f"/training/jobs/{quote(job_id)}")

    def create_training_job(self, body: dict) -> dict:
        return self._json("POST", "/training/jobs", json=body)

    def cancel_training_job(self, job_id: str) -> dict:
        return self._json("POST", f"/training/jobs/{quote(job_id)}/cancel")

    def candidates(self) -> list[dict]:
        reply = self._json("GET", "/training/candidates", params={"page_size": 50})
        return reply.get("candidates", [])

    def candidate_action(self, name: str, version: int, action: str, body: dict | None = None):
        path = f"/training/candidates/{adapter_ref(name, version)}/{action}"
        return self._json("POST", path, json=body)

    def federate(self, body: dict) -> dict:
        return self._json("POST", "/training/federations", json=body)
