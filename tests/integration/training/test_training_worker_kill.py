"""A training worker killed with SIGKILL mid-job: its lease expires, another worker takes
the job and resumes it from the last checkpoint, and the job completes."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys

import pytest

from loraplex.training.v1 import training_service_pb2 as pb
from services.common.channels import open_channel
from services.common.redis import connect
from services.common.settings import REPO_ROOT
from services.training.trainer import COMPLETE
from services.training.worker import Worker
from tests.helpers import eventually, new_tenant
from tests.integration.training.test_training_service import sft_request, watch

# A generous limit: two model loads and a worker process start on a shared 2-core machine
# (200 s was once not enough while a benchmark ran beside the suite).
pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(400)]


# Single Redis only: the rescue is about a process dying, not Redis's topology. On the test
# cluster (one database shared by every test) the rescue stalls when this runs late in the
# session; that is not yet understood (docs/tuning.md, Redis Cluster: known gaps).
@pytest.mark.parametrize("redis_url", ["single"], indirect=True)
async def test_a_killed_worker_loses_nothing(training_stub, training_servers, tmp_path):
    # a longer lease than the other tests': the rescuer trains in this test's process, and a
    # busy machine must not make it miss its own heartbeats
    s = training_servers.settings.model_copy(update={"lease_seconds": 8.0})
    tenant = new_tenant()
    job = (await training_stub.CreateJob(sft_request(tenant, max_steps=9, batch_size=2))).job
    env = {
        **os.environ,
        "REDIS_URL": training_servers.redis_url,
        "INFERENCE_ADDR": training_servers.inference_addr,
        "TRAINING_DIR": str(s.training_dir),
        "LEASE_SECONDS": str(s.lease_seconds),
        "HEARTBEAT_SECONDS": str(s.heartbeat_seconds),
        "POLL_SECONDS": str(s.poll_seconds),
        "CHECKPOINT_STEPS": str(s.checkpoint_steps),
        "METRICS_PORT": "0",
    }
    log = (tmp_path / "worker.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.training.worker"],
        cwd=REPO_ROOT,
        env=env,
        stdout=log,
        stderr=log,
    )
    # the first checkpoint, once whole (a partial one is never resumed from)
    checkpoint = (
        s.training_dir / job.id / "checkpoints" / f"checkpoint-{s.checkpoint_steps}" / COMPLETE
    )
    try:
        assert await eventually(checkpoint.exists, timeout=240), (
            tmp_path / "worker.log"
        ).read_text()[-3000:]
        running = (await training_stub.GetJob(pb.GetJobRequest(tenant=tenant, job_id=job.id))).job
        assert running.state == pb.JOB_STATE_RUNNING and running.attempts == 1
        os.kill(proc.pid, signal.SIGKILL)  # mid-job: no clean-up of any kind
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    stuck = (await training_stub.GetJob(pb.GetJobRequest(tenant=tenant, job_id=job.id))).job
    assert stuck.state == pb.JOB_STATE_RUNNING and stuck.progress.step < 9

    redis = connect(training_servers.redis_url)
    channel = open_channel(training_servers.inference_addr)
    rescuer = Worker(s, redis, channel, name="rescuer")
    rescuer.start()  # reaps the expired lease, claims the job, resumes it
    try:
        final = (await asyncio.wait_for(watch(training_stub, tenant, job.id), 150))[-1]
    except TimeoutError:
        stuck = (await training_stub.GetJob(pb.GetJobRequest(tenant=tenant, job_id=job.id))).job
        pytest.fail(f"the job did not finish after the kill: {stuck}")
    finally:
        await rescuer.close()
        await channel.close()
        await redis.aclose()
    assert final.state == pb.JOB_STATE_SUCCEEDED, final.error_message
    assert final.attempts == 2 and final.record.resumes == 1
    assert final.record.resumed_from_step >= s.checkpoint_steps  # not from scratch
    assert final.record.steps == 9 and final.candidate.version == 1
