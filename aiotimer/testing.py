"""Test helpers: a mock clock that makes timer tests exact and instant, and a recording reaper.

Fixtures for pytest live in ``aiotimer.pytest_plugin``
(``pytest_plugins = ["aiotimer.pytest_plugin"]``).
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import Callable

from ._expiry import Expiry

__all__ = ["MockClock", "RecordingReaper", "settle"]


class _MockHandle:
    __slots__ = ("callback", "cancelled")

    def __init__(self, callback: Callable[[], None]) -> None:
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class MockClock:
    """A clock that moves only when told to (``jump``/``advance``).

    ``now()`` starts at ``start``; ``wall()`` is ``now() + wall_offset``.
    Alarms set through ``call_later`` run when a jump reaches their time, in
    time order, so a test can place the clock exactly on, just before, or just
    after a deadline.

    It drives deadlines set in the test's own process, on its time line
    (``server.local_channel().acquire(pid, scope, clock.now() + after)``).  It
    cannot drive a *spawned worker's* ``expires()``: a worker stamps its
    deadlines with its own ``CLOCK_MONOTONIC``, which the server maps onto its
    clock through the kernel's offset, so on a mock clock (which starts at 0)
    they land the machine's uptime ahead and never come due.  Test spawned
    workers on the system clock, with short real deadlines.
    """

    def __init__(self, start: float = 0.0, *, wall_offset: float = 1_700_000_000.0) -> None:
        self._now = float(start)
        self.wall_offset = float(wall_offset)
        self._alarms: list[tuple[float, int, _MockHandle]] = []
        self._seq = itertools.count()

    def __repr__(self) -> str:
        pending = sum(1 for *_, h in self._alarms if not h.cancelled)
        return f"MockClock(now={self._now}, alarms={pending})"

    def now(self) -> float:
        """The mock monotonic time."""
        return self._now

    def wall(self) -> float:
        """The mock wall-clock time: ``now() + wall_offset``."""
        return self._now + self.wall_offset

    def call_later(self, delay: float, callback: Callable[[], None]) -> _MockHandle:
        """Run ``callback`` once the mock time reaches ``now() + delay``."""
        handle = _MockHandle(callback)
        when = self._now + max(0.0, delay)
        if when <= self._now:
            asyncio.get_running_loop().call_soon(self._fire, handle)
        else:
            heapq.heappush(self._alarms, (when, next(self._seq), handle))
        return handle

    @staticmethod
    def _fire(handle: _MockHandle) -> None:
        if not handle.cancelled:
            handle.cancelled = True
            handle.callback()

    def jump(self, seconds: float) -> None:
        """Move time forward by ``seconds`` and run the alarms that became due."""
        if seconds < 0:
            raise ValueError(f"`seconds` must be >= 0: time does not go back, got {seconds}")
        self._now += seconds
        while self._alarms and self._alarms[0][0] <= self._now:
            _, _, handle = heapq.heappop(self._alarms)
            self._fire(handle)

    async def advance(self, seconds: float) -> None:
        """``jump(seconds)``, then let the loop run until the server has reacted."""
        self.jump(seconds)
        await settle()


async def settle(rounds: int = 20) -> None:
    """Yield to the loop ``rounds`` times so callbacks and woken tasks can run."""
    for _ in range(rounds):
        await asyncio.sleep(0)


class RecordingReaper:
    """A reaper that records each ``Expiry`` and signals nothing (or raises, if told to)."""

    def __init__(self, *, fail_times: int = 0) -> None:
        self.expiries: list[Expiry] = []
        self.calls = 0
        self.fail_times = fail_times

    def __repr__(self) -> str:
        return f"RecordingReaper(expiries={len(self.expiries)})"

    def __call__(self, expiry: Expiry) -> None:
        """Record ``expiry``; raise ``RuntimeError`` for the first ``fail_times`` calls."""
        self.calls += 1
        if self.calls <= self.fail_times:
            raise RuntimeError(f"reaper failure {self.calls} of {self.fail_times} (on purpose)")
        self.expiries.append(expiry)

    @property
    def scopes(self) -> list[list[str]]:
        """The expired scopes of each recorded expiry."""
        return [[t.scope for t in e.timers] for e in self.expiries]
