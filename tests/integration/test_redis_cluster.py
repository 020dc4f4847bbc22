"""What only a Redis Cluster shows: a script or transaction spanning slots is refused
(so the cluster runs of the integration tests would catch one), scripts pipelined over
several tenants reach their nodes and are reloaded after a SCRIPT FLUSH, and a message
published on any node reaches a subscriber (the other tests run on both kinds of Redis)."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis
from redis.exceptions import CrossSlotTransactionError, RedisClusterException, ResponseError

from services.common.keys import key
from services.common.pubsub import ChannelListener
from services.common.redis import connect, run_script_many
from tests.helpers import eventually, new_tenant

pytestmark = pytest.mark.integration

_INCR = "return redis.call('INCRBY', KEYS[1], ARGV[1])"


@pytest.fixture
async def cluster(cluster_redis_url):
    client = connect(cluster_redis_url)
    await client.initialize()
    yield client
    await client.aclose()


async def test_keys_of_two_tenants_in_one_script_or_transaction_are_refused(
    cluster, _cross_slot_log
):
    a, b = new_tenant(), new_tenant()
    script = cluster.register_script("return redis.call('MGET', KEYS[1], KEYS[2])")
    with pytest.raises(RedisClusterException, match="same key slot"):
        await script(keys=[key(a, "x"), key(b, "x")])
    # Pipelined calls are routed by their first key; the server refuses the rest.
    with pytest.raises(ResponseError, match="don't hash to the same slot"):  # CROSSSLOT
        await run_script_many(cluster, script, [([key(a, "x"), key(b, "x")], [])])
    assert _cross_slot_log.pop()[3:5] == (key(a, "x"), key(b, "x"))  # the guard saw it too
    with pytest.raises(CrossSlotTransactionError):
        async with cluster.pipeline(transaction=True) as pipe:
            pipe.set(key(a, "x"), 1)
            pipe.set(key(b, "x"), 1)
            await pipe.execute()
    assert await cluster.exists(key(a, "x"), key(b, "x")) == 0  # neither half applied
    assert await script(keys=[key(a, "x"), key(a, "y")]) == [None, None]  # one tenant: fine


async def test_pipelined_scripts_reach_every_node_and_reload_after_a_flush(cluster):
    tenants = [f"spread-{i}" for i in range(12)]  # fixed names: fixed slots
    nodes = {cluster.get_node_from_key(key(t, "n")).name for t in tenants}
    assert len(nodes) == 3  # the calls really spread over the 3 masters
    script = cluster.register_script(_INCR)
    calls = [([key(t, "n")], [i + 1]) for i, t in enumerate(tenants)]
    assert await run_script_many(cluster, script, calls) == list(range(1, 13))
    for node in cluster.get_primaries():
        plain = aioredis.Redis(host=node.host, port=node.port)
        await plain.script_flush()
        await plain.aclose()
    assert await run_script_many(cluster, script, calls) == [2 * (i + 1) for i in range(12)]


class Recorder(ChannelListener):
    def __init__(self, redis, channel: str) -> None:
        super().__init__(redis, channel, name="test listener")
        self.got: list[bytes] = []

    async def handle(self, data: bytes) -> None:
        self.got.append(data)


async def test_a_message_published_on_any_node_reaches_a_subscriber(cluster):
    channel = key("_platform", "events", new_tenant())
    listener = Recorder(cluster, channel)
    listener.start()
    try:
        await listener.wait_subscribed()
        await asyncio.sleep(0.1)  # the SUBSCRIBE has reached its node
        for node in cluster.get_primaries():
            plain = aioredis.Redis(host=node.host, port=node.port)
            await plain.publish(channel, node.name)
            await plain.aclose()
        want = sorted(n.name.encode() for n in cluster.get_primaries())
        assert await eventually(lambda: sorted(listener.got) == want)
    finally:
        await listener.close()
