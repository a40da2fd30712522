"""Built-in reapers: what the server does to a process whose timer expired."""

from __future__ import annotations

import signal as _signal
from collections.abc import Coroutine
from typing import Any

from ._events import EVENT_LOGGED, logger
from ._expiry import Expiry
from ._linux import signal_name
from ._validate import check_seconds, check_signal

__all__ = ["SignalReaper"]

_SIGKILL = int(_signal.SIGKILL)


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
            signal_name(sig),
            extra=EVENT_LOGGED,  # the SignalSent event that follows says it too
        )
        expiry.send_signal(_signal.SIGKILL, group=self.process_group)
