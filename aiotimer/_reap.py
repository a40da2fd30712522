"""Kill callbacks ("reapers"): what the server does to a process whose timer expired."""

from __future__ import annotations

import signal as _signal
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ._events import logger
from ._process import ProcessGone, pidfd_no_wakeup_preemption
from ._validate import check_seconds, check_signal

if TYPE_CHECKING:
    from ._heap import Timer
    from ._workers import WatchedProcess, Worker

__all__ = ["ExpiredTimer", "Expiry", "Reaper", "SignalReaper"]


@dataclass(frozen=True)
class ExpiredTimer:
    """One timer that expired: its scope, its deadline and how late it was handled."""

    scope: str
    deadline: float
    lag: float


class Expiry:
    """What a reaper is handed: one process and the timers of it that expired.

    Signals go through the process's pidfd, so a process that has exited (its
    pid possibly reused) is never signalled: ``send_signal`` returns ``False``.
    """

    __slots__ = (
        "_expired",
        "_now",
        "_on_signal",
        "_process",
        "_timers",
        "requested_signal",
        "signals_sent",
    )

    def __init__(
        self,
        process: WatchedProcess,
        timers: list[Timer],
        now: float,
        requested_signal: int | None,
        on_signal: Callable[[Expiry, int], None],
    ) -> None:
        # Built in the middle of a kill burst: ``timers`` is converted only when
        # first read, after the signals have gone out.
        self._process = process
        self._timers = timers
        self._now = now
        self._expired: tuple[ExpiredTimer, ...] | None = None
        self.requested_signal = requested_signal
        self._on_signal = on_signal
        self.signals_sent: list[int] = []

    def __repr__(self) -> str:
        scopes = ", ".join(t.scope for t in self.timers)
        return f"<Expiry pid={self.pid} scopes=[{scopes}]>"

    @property
    def timers(self) -> tuple[ExpiredTimer, ...]:
        """The process's expired timers, earliest first."""
        if self._expired is None:
            now = self._now
            self._expired = tuple(
                ExpiredTimer(t.scope, t.deadline, now - t.deadline) for t in self._timers
            )
        return self._expired

    @property
    def pid(self) -> int:
        """The process whose timers expired."""
        return self._process.pid

    @property
    def deadline(self) -> float:
        """The earliest of the expired deadlines."""
        return self._timers[0].deadline

    @property
    def worker(self) -> Worker | None:
        """The spawned worker this process is (or descends from), if the server spawned it."""
        return self._process.worker

    @property
    def dump_signal(self) -> int:
        """The signal on which this process said it dumps its stacks (0: it did not say)."""
        return self._process.dump_signal

    @property
    def exited(self) -> bool:
        """Whether the process has exited."""
        return self._process.exited

    def send_signal(self, sig: int, *, group: bool = False) -> bool:
        """Send ``sig`` (to the process group with ``group``); ``False`` if it has exited."""
        try:
            self._process.send_signal(sig, group=group)
        except ProcessGone:
            return False
        self.signals_sent.append(sig)
        self._on_signal(self, sig)
        return True

    def no_wakeup_preemption(self) -> bool:
        """Keep this process, once signalled, from preempting the server (SCHED_BATCH).

        For a process about to be killed; see ``SignalReaper.prepare``.
        """
        process = self._process
        return pidfd_no_wakeup_preemption(process.pidfd, process.pid)

    def dump_stacks(self) -> bool:
        """Ask the process to print its stacks (``dump_signal``); ``False`` if it cannot.

        Not a kill: it does not count as the expiry's first signal.
        """
        if self.dump_signal <= 0:
            return False
        try:
            self._process.send_signal(self.dump_signal)
        except ProcessGone:
            return False
        logger.info("asked pid %d to dump its stacks", self.pid)
        return True

    async def wait_exit(self, timeout: float | None = None) -> bool:
        """Wait for the process to exit; ``False`` if ``timeout`` seconds passed first."""
        return await self._process.wait_exit(timeout)


_SIGKILL = int(_signal.SIGKILL)

#: A reaper: any callable taking an ``Expiry``; it may be a coroutine function.
Reaper = Callable[[Expiry], Awaitable[object] | object]


class SignalReaper:
    """The built-in reaper: signal, wait ``grace``, then SIGKILL if still alive.

    With ``dump_stacks``, a process that registered a stack-dump signal (every
    aiotimer client does) is sent it first and given ``dump_wait`` seconds, so
    its Python stacks are printed even while it holds the GIL in C code.  A
    ``TimerServer`` with this reaper tells the workers it spawns to register
    their dump on ``dump_signal``.  With
    ``process_group``, signals go to the process group the process leads.
    A signal that a torch FIFO client asked for takes precedence over ``signal``.
    """

    def __init__(
        self,
        signal: int | str = _signal.SIGKILL,
        *,
        grace: float = 5.0,
        process_group: bool = False,
        dump_stacks: bool = False,
        dump_wait: float = 0.5,
        dump_signal: int | str = _signal.SIGUSR2,
    ) -> None:
        self.signal = check_signal("signal", signal)
        self._signo = int(self.signal)  # a plain int is quicker on the kill path
        self.grace = check_seconds("grace", grace, allow_zero=True)
        self.process_group = bool(process_group)
        self.dump_stacks = bool(dump_stacks)
        self.dump_wait = check_seconds("dump_wait", dump_wait, allow_zero=True)
        #: the signal spawned workers register their stack dump on (read by TimerServer)
        self.dump_signal = check_signal("dump_signal", dump_signal)

    def __repr__(self) -> str:
        return (
            f"SignalReaper({self.signal.name}, grace={self.grace}, "
            f"process_group={self.process_group}, dump_stacks={self.dump_stacks})"
        )

    def prepare(self, expiry: Expiry) -> None:
        """Called for every process of a burst before any is reaped.

        A process about to get SIGKILL is moved to SCHED_BATCH first, so that the
        kernel tearing down the first victims does not preempt the server while it
        signals the others (on 2 cores, 64 victims: ~20 ms of signalling becomes
        ~0.5 ms).  It keeps its share of the CPU, so it still dies promptly.
        """
        if (expiry.requested_signal or self._signo) == _SIGKILL and not self.dump_stacks:
            expiry.no_wakeup_preemption()

    def __call__(self, expiry: Expiry) -> Coroutine[Any, Any, None] | None:
        """Reap ``expiry``'s process.

        Sends the signal at once, during the call, and returns a coroutine only
        for what must wait: a stack dump first, or escalation after ``grace``.
        """
        if self.dump_stacks and expiry.dump_signal > 0:
            return self._dump_then_kill(expiry)
        return self._kill(expiry)

    def _kill(self, expiry: Expiry) -> Coroutine[Any, Any, None] | None:
        sig = expiry.requested_signal or self._signo
        if not expiry.send_signal(sig, group=self.process_group) or sig == _SIGKILL:
            return None
        return self._escalate(expiry, sig)

    async def _dump_then_kill(self, expiry: Expiry) -> None:
        if expiry.dump_stacks() and await expiry.wait_exit(self.dump_wait):
            return
        follow_up = self._kill(expiry)
        if follow_up is not None:
            await follow_up

    async def _escalate(self, expiry: Expiry, sig: int) -> None:
        if await expiry.wait_exit(self.grace):
            return
        logger.warning(
            "pid %d still alive %.3gs after %s; sending SIGKILL",
            expiry.pid,
            self.grace,
            _signal.Signals(sig).name,
        )
        expiry.send_signal(_signal.SIGKILL, group=self.process_group)
