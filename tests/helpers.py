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
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from aiotimer._heap import DeadlineHeap, Timer

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


# -- a heap's insides, for tests (the server never needs them) --------------------


def timers_of(heap: DeadlineHeap, owner: int) -> list[Timer]:
    """``owner``'s live timers in ``heap``, in no particular order."""
    state = heap._owners.get(owner)
    return [] if state is None else state.timers()


def owners(heap: DeadlineHeap) -> list[int]:
    """Every owner with a live timer in ``heap``."""
    return list(heap._owners)


def pop_expired(heap: DeadlineHeap, now: float) -> list[tuple[int, list[Timer]]]:
    """Pop every timer due at ``now``, by owner (earliest first, within and across owners)."""
    groups: dict[int, list[Timer]] = {}
    while (timer := heap.pop_due(now)) is not None:
        groups.setdefault(timer.owner, []).append(timer)
    return list(groups.items())
