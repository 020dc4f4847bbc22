"""Unit-test fixtures shared by the engine's tests."""

from __future__ import annotations

import asyncio

import pytest

from services.inference.scheduler import Scheduler
from services.inference.settings import BatchingLimits


@pytest.fixture
async def make_scheduler():
    """make_scheduler(runner, **limits): a started Scheduler, stopped after the test."""
    started: list[Scheduler] = []

    def make(runner, **limits) -> Scheduler:
        scheduler = Scheduler(runner, BatchingLimits(**limits))
        scheduler.start()
        started.append(scheduler)
        return scheduler

    yield make
    for scheduler in started:
        await asyncio.to_thread(scheduler.stop)
