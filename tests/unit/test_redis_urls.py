"""REDIS_URL picks the client kind, and the cross-slot guard the integration tests rely on
catches what it must (no server needed: neither connects until its first command)."""

from __future__ import annotations

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import Connection, SSLConnection

from services.common.keys import key
from services.common.redis import connect, is_cluster_url
from services.experiments.keys import DEFINITIONS_CHANNEL
from tests.slots import cross_slot_commands


async def test_cluster_schemes_select_a_cluster_client():
    client = connect("redis+cluster://10.0.0.7:7001")
    assert isinstance(client, RedisCluster)
    assert [(n.host, n.port) for n in client.nodes_manager.startup_nodes.values()] == [
        ("10.0.0.7", 7001)
    ]
    tls = connect("rediss+cluster://10.0.0.7:7001")
    assert tls.connection_kwargs["connection_class"] is SSLConnection
    await client.aclose()
    await tls.aclose()


async def test_other_schemes_select_a_single_server_client():
    for url in ("redis://127.0.0.1:6379/3", "rediss://h:6380/0", "unix:///tmp/r.sock"):
        client = connect(url)
        assert isinstance(client, aioredis.Redis) and not is_cluster_url(url)
        await client.aclose()
    assert is_cluster_url("redis+cluster://h:1") and is_cluster_url("rediss+cluster://h:1")


def test_guard_flags_a_command_or_script_spanning_two_tenants_or_declaring_no_keys():
    packer = Connection()
    with cross_slot_commands() as seen:
        packer.pack_command("HGET", key("a", "adapters"), "x")  # one tag: fine
        packer.pack_command("EVALSHA", "0" * 40, 1, key("a", "q"), key("a", "item", ""))
        packer.pack_command("EVALSHA", "0" * 40, 1, key("a", "q"), DEFINITIONS_CHANNEL)
        assert seen == []
        packer.pack_command("EVALSHA", "0" * 40, 0, DEFINITIONS_CHANNEL, "{}")  # no keys
        assert seen == []
        packer.pack_command("MGET", key("a", "x"), key("b", "x"))
        packer.pack_command("EVALSHA", "0" * 40, 1, key("a", "q"), key("b", "item", ""))
        packer.pack_command("EVALSHA", "0" * 40, 0, key("a", "job", "1"), "token")
    assert [args[:3] for args in seen] == [
        ("MGET", key("a", "x"), key("b", "x")),
        ("EVALSHA", "0" * 40, 1),
        ("EVALSHA", "0" * 40, 0),
    ]
