"""Helpers the test modules share (``pythonpath = ["tests"]`` makes this importable).

Generous bounds: two shared, noisy cores run these; a bound is how long a
broken run takes to fail, never what a passing run should take.
"""

from __future__ import annotations

import asyncio
import sys
import textwrap
import time
from collections.abc import Callable

#: How long a test waits for something that normally takes milliseconds.
WAIT = 60.0


def py(code: str) -> list[str]:
    """argv that runs ``code`` (dedented) in a fresh interpreter."""
    return [sys.executable, "-c", textwrap.dedent(code)]


async def until(predicate: Callable[[], object], timeout: float = WAIT) -> None:
    """Return once ``predicate()`` is true; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met in {timeout:g}s")
        await asyncio.sleep(0.005)
