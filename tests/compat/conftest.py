"""Fixtures shared by the compat tests (they need no torch)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from aiotimer.compat import torch as compat


@pytest.fixture
def fifo(tmp_path: Path) -> str:
    """Where a test's FIFO goes."""
    return str(tmp_path / "timer.fifo")


@pytest.fixture
def file_server(fifo: str) -> Iterator[compat.FileTimerServer]:
    """A started drop-in ``FileTimerServer`` on ``fifo``, stopped afterwards."""
    server = compat.FileTimerServer(fifo, run_id="test", max_interval=0.01)
    server.start()
    yield server
    server.stop()
