"""In-process requests: the launcher's own code, tests, and bridges from other transports."""

from __future__ import annotations

import os
from collections.abc import Iterable

from .._channel import Channel, RequestSink
from .._processes import descendant_of
from .._protocol import SIGNAL_DEFAULT, SIGNAL_LOG_ONLY, Op, Request
from .._validate import check_signal

__all__ = ["LocalChannel"]


class LocalChannel(Channel):
    """Submit requests from inside the server's process, on its loop.

    By default a request may name this process or any process of this user
    that descends from it (or from ``roots``); ``pids`` admits exactly those.
    Deadlines are on the server's clock (``wall=True``: the wall clock).
    """

    def __init__(
        self,
        sink: RequestSink,
        *,
        roots: Iterable[int] = (),
        pids: Iterable[int] | None = None,
        name: str = "local channel",
    ) -> None:
        super().__init__(sink)
        self.name = name
        self.roots = frozenset((os.getpid(), *roots))
        self.pids = None if pids is None else frozenset(pids)

    def entitled(self, pid: int) -> str | None:
        """See the class docstring."""
        if self.pids is not None:
            return None if pid in self.pids else f"pid {pid} is not one this channel admits"
        return descendant_of(pid, self.roots)

    def submit(self, requests: Iterable[Request], errors: Iterable[str] = ()) -> None:
        """Apply ``requests`` now; each error string is logged as a rejection."""
        self.sink.dispatch(self, list(requests), list(errors))

    def acquire(
        self,
        pid: int,
        scope: str,
        deadline: float,
        *,
        wall: bool = False,
        signal: int | None = None,
    ) -> None:
        """Arm ``(pid, scope)`` until ``deadline`` (the server clock's time, or wall time).

        ``signal``: what to kill it with (``None``: the reaper's choice; ``<= 0``,
        as in torch: report the expiry, signal nothing).
        """
        if signal is None:
            sig = SIGNAL_DEFAULT
        elif isinstance(signal, int) and signal <= 0:
            sig = SIGNAL_LOG_ONLY
        else:
            sig = int(check_signal("signal", signal))
        op = Op.ACQUIRE_WALL if wall else Op.ACQUIRE
        self.submit([Request(op, pid, scope, deadline, sig)])

    def release(self, pid: int, scope: str) -> None:
        """Disarm ``(pid, scope)``."""
        self.submit([Request(Op.RELEASE, pid, scope, 0.0)])
