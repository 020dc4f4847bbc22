"""One adapter version as the registry and the store hold it: for the services that build on
registered adapters (training continues from them and federates them) and for candidates.

AdapterVersions is the domain layer behind GetAdapter and DiscardCandidate. Lookups are
scoped like requests: the tenant's own adapters, else the platform's shared ones; another
tenant's adapter is NOT_FOUND, as if it did not exist.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from services.common.names import check_tenant
from services.inference.registry import AdapterRecord, AdapterRegistry
from services.inference.store import AdapterFiles, AdapterStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AdapterVersion:
    record: AdapterRecord
    serving: bool
    candidate: bool
    files: AdapterFiles | None = None


class AdapterVersions:
    def __init__(self, registry: AdapterRegistry, store: AdapterStore) -> None:
        self.registry = registry
        self.store = store

    async def get(
        self, tenant: str, name: str, version: int = 0, include_files: bool = False
    ) -> AdapterVersion:
        record = await self.registry.resolve(tenant, name, version)
        serving = await self.registry.serving_version(record.owner, record.name)
        candidate = await self.registry.is_candidate(record.owner, record.name, record.version)
        files = None
        if include_files:  # DATA_LOSS when the stored file fails its sha256 check
            files = await asyncio.to_thread(
                self.store.load, record.owner, record.name, record.sha256
            )
        return AdapterVersion(record, serving == record.version, candidate, files)

    async def discard(self, tenant: str, name: str, version: int) -> AdapterRecord:
        """Only the tenant's own candidates (shared adapters are the platform's)."""
        record = await self.registry.discard(check_tenant(tenant), name, version)
        log.info(
            "candidate discarded", extra={"owner": tenant, "adapter": name, "version": version}
        )
        return record
