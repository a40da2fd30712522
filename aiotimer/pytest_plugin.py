"""pytest fixtures for code that uses aiotimer: ``pytest_plugins = ["aiotimer.pytest_plugin"]``."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from ._server import TimerServer
from .testing import MockClock, RecordingReaper

__all__ = ["mock_clock", "recording_reaper", "timer_server"]


@pytest.fixture
def mock_clock() -> MockClock:
    """A ``MockClock`` at time 0."""
    return MockClock()


@pytest.fixture
def recording_reaper() -> RecordingReaper:
    """A reaper that records expiries and kills nothing."""
    return RecordingReaper()


@pytest_asyncio.fixture
async def timer_server(
    mock_clock: MockClock, recording_reaper: RecordingReaper
) -> AsyncIterator[TimerServer]:
    """A running ``TimerServer`` on ``mock_clock`` that reaps into ``recording_reaper``."""
    async with TimerServer(clock=mock_clock, reaper=recording_reaper) as server:
        yield server
