"""TenantKeyStore against a real Redis."""

from __future__ import annotations

import pytest
import redis.asyncio as aioredis

from gateway.keys import TenantKeyStore
from services.common.errors import AlreadyExists, InvalidArgument, NotFound


@pytest.fixture
def store(redis_client: aioredis.Redis) -> TenantKeyStore:
    return TenantKeyStore(redis_client)


async def test_tenants_are_created_once_and_listed(store: TenantKeyStore) -> None:
    await store.create_tenant("shop")
    await store.create_tenant("bank")
    with pytest.raises(AlreadyExists):
        await store.create_tenant("bank")
    assert [t.tenant for t in await store.list_tenants()] == ["bank", "shop"]
    assert await store.tenant_exists("bank")
    assert not await store.tenant_exists("nobody")


@pytest.mark.parametrize("bad", ["", "Bank", "_platform", "a/b", "a:b", "x" * 64])
async def test_invalid_tenant_ids_are_refused(store: TenantKeyStore, bad: str) -> None:
    with pytest.raises(InvalidArgument):
        await store.create_tenant(bad)


async def test_key_resolves_to_its_tenant_only(store: TenantKeyStore) -> None:
    await store.create_tenant("bank")
    await store.create_tenant("shop")
    bank = await store.create_key("bank")
    shop = await store.create_key("shop")
    assert bank.api_key.startswith("lpx_") and bank.api_key != shop.api_key
    assert (await store.resolve(bank.api_key)).tenant == "bank"
    assert (await store.resolve(shop.api_key)).tenant == "shop"
    assert await store.resolve(bank.api_key + "x") is None
    assert await store.resolve("") is None


async def test_key_for_unknown_tenant_is_not_found(store: TenantKeyStore) -> None:
    with pytest.raises(NotFound):
        await store.create_key("ghost")


async def test_raw_key_is_never_stored(store: TenantKeyStore, redis_client: aioredis.Redis) -> None:
    await store.create_tenant("bank")
    issued = await store.create_key("bank")
    secret = issued.api_key.encode()
    for name in await redis_client.keys("*"):
        assert secret not in name
        dumped = await redis_client.dump(name)
        assert dumped is not None and secret not in dumped


async def test_revoked_key_stops_resolving(store: TenantKeyStore) -> None:
    await store.create_tenant("bank")
    issued = await store.create_key("bank")
    kept = await store.create_key("bank")
    assert await store.list_key_ids("bank") == sorted([issued.key_id, kept.key_id])
    await store.revoke_key("bank", issued.key_id)
    assert await store.resolve(issued.api_key) is None
    assert (await store.resolve(kept.api_key)).tenant == "bank"
    assert await store.list_key_ids("bank") == [kept.key_id]
    with pytest.raises(NotFound):
        await store.revoke_key("bank", issued.key_id)


async def test_tenant_cannot_revoke_another_tenants_key(store: TenantKeyStore) -> None:
    await store.create_tenant("bank")
    await store.create_tenant("shop")
    bank = await store.create_key("bank")
    with pytest.raises(NotFound):
        await store.revoke_key("shop", bank.key_id)
    assert (await store.resolve(bank.api_key)).tenant == "bank"
