"""The Assign hot path's own Redis connections (services/experiments/pipe.py) against a real
redis-server with a password and a non-zero db: pipelining, NOSCRIPT, reconnects, errors."""

from __future__ import annotations

import asyncio
import tempfile
from concurrent.futures import ThreadPoolExecutor

import pytest
import redis
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from services.common.localhost import free_port, start_redis_server
from services.experiments import core
from services.experiments.core import ExperimentStore, Update
from services.experiments.model import Experiment, Status, Variant
from services.experiments.pipe import ScriptPipe, SyncScriptConnection

pytestmark = pytest.mark.integration

SCRIPT = """
if ARGV[1] == 'fail' then return redis.error_reply('ERR asked to fail') end
return {ARGV[1], redis.call('INCR', KEYS[1])}
"""


@pytest.fixture(scope="module")
def secured_redis_url():
    port = free_port()
    proc = start_redis_server(port, tempfile.mkdtemp(prefix="pipe-redis-"))
    with redis.Redis(port=port) as admin:
        admin.config_set("requirepass", "s3cret")
    yield f"redis://:s3cret@127.0.0.1:{port}/3"
    proc.terminate()
    proc.wait(10)


async def test_script_pipe_pipelines_authenticates_and_recovers(secured_redis_url):
    client = aioredis.Redis.from_url(secured_redis_url)
    assert ScriptPipe.supports(client)
    pipe = ScriptPipe(client, SCRIPT)
    try:
        replies = await asyncio.gather(*(pipe.call(1, "counter", f"x{i}") for i in range(300)))
        assert [r[0] for r in replies] == [f"x{i}".encode() for i in range(300)]  # in order
        assert sorted(r[1] for r in replies) == list(range(1, 301))
        assert int(await client.get("counter")) == 300  # db 3, after AUTH
        with pytest.raises(ResponseError, match="asked to fail"):
            await pipe.call(1, "counter", "fail")
        await client.script_flush()  # e.g. a Redis restart: EVALSHA answers NOSCRIPT
        assert (await pipe.call(1, "counter", "y"))[1] == 301
        await client.execute_command("CLIENT", "KILL", "TYPE", "normal")
        await asyncio.sleep(0.2)  # the pipe sees its connection close
        assert (await pipe.call(1, "counter", "z"))[1] == 302  # and opens a new one
    finally:
        pipe.close()
        await client.aclose()


async def test_blocking_connection_does_the_same_from_threads(secured_redis_url):
    client = aioredis.Redis.from_url(secured_redis_url)
    conn = SyncScriptConnection(client, SCRIPT)
    try:
        await client.delete("blocking")
        replies = await asyncio.gather(
            *(asyncio.to_thread(conn.call, 1, "blocking", f"t{i}") for i in range(50))
        )
        assert sorted(r[1] for r in replies) == list(range(1, 51))
        with pytest.raises(ResponseError, match="asked to fail"):
            await asyncio.to_thread(conn.call, 1, "blocking", "fail")
        await client.script_flush()
        assert (await asyncio.to_thread(conn.call, 1, "blocking", "y"))[1] == 51
        # a killed connection fails the one call that meets it; that thread reconnects
        one_thread = ThreadPoolExecutor(max_workers=1)
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(one_thread, conn.call, 1, "blocking", "before-kill")
        await client.execute_command("CLIENT", "KILL", "TYPE", "normal")
        with pytest.raises(RedisConnectionError):
            await loop.run_in_executor(one_thread, conn.call, 1, "blocking", "after-kill")
        again = await loop.run_in_executor(one_thread, conn.call, 1, "blocking", "again")
        assert again[0] == b"again"
        one_thread.shutdown()
    finally:
        conn.close()
        await client.aclose()


async def test_store_falls_back_to_redis_py_where_the_pipe_does_not_apply(
    redis_url, exp_redis, monkeypatch
):
    monkeypatch.setattr(core.ScriptPipe, "supports", staticmethod(lambda redis: False))
    client = aioredis.Redis.from_url(redis_url)
    store = ExperimentStore(client, 1.0)
    assert isinstance(store._assign, core._RedisPyScript) and store._assign_blocking is None
    try:
        from experiments_testlib import new_tenant

        tenant = new_tenant()
        exp = Experiment(
            "fallback", tenant, (Variant("a", (), 0.5), Variant("b", (), 0.5)), status=Status.DRAFT
        )
        await store.create(exp)
        await store.update(tenant, "fallback", Update(action="start"))
        first = await store.assign(tenant, "fallback", "alice")
        again = await store.assign(tenant, "fallback", "alice")
        assert first.in_experiment and not first.sticky
        assert again.sticky and again.variant_index == first.variant_index
        loop = asyncio.get_running_loop()
        third = await asyncio.to_thread(store.assign_blocking, tenant, "fallback", "alice", loop)
        assert third.sticky and third.variant_index == first.variant_index
        counts = await store.variant_counts(await store.get(tenant, "fallback"))
        assert sum(counts.units) == 1 and sum(counts.assignments) == 3
        assert sum(counts.assignments_squared) == 9  # one unit, assigned 3 times
    finally:
        store.close()
        await client.aclose()
