"""In-process requests: the launcher's own code, tests, and bridges from other transports."""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import TYPE_CHECKING

from .._process import descends_from, process_uid
from .._protocol import Op, Request
from ._base import Channel

if TYPE_CHECKING:
    from .._server import TimerServer

__all__ = ["LocalChannel", "default_entitlement", "foreign_entitlement"]


def default_entitlement(pid: int, roots: frozenset[int]) -> str | None:
    """Entitled: a process of this user that is, or descends from, one of ``roots``."""
    uid = process_uid(pid)
    if uid is None:
        return f"pid {pid} does not exist"
    if uid != os.getuid():
        return f"pid {pid} belongs to uid {uid}, not to this server's uid {os.getuid()}"
    if not descends_from(pid, roots):
        names = ", ".join(str(r) for r in sorted(roots))
        return f"pid {pid} does not descend from the server or a configured root ({names})"
    return None


def foreign_entitlement(pid: int, roots: frozenset[int]) -> str | None:
    """For requests from other processes (FIFO, queue): as above, and never the server."""
    if pid == os.getpid():
        return f"pid {pid} is the timer server itself"
    return default_entitlement(pid, roots)


class LocalChannel(Channel):
    """Submit requests from inside the server's process, on its loop.

    By default a request may name this process or any process of this user
    that descends from it (or from ``roots``); ``pids`` admits exactly those.
    """

    def __init__(
        self,
        server: TimerServer,
        *,
        roots: Iterable[int] = (),
        pids: Iterable[int] | None = None,
        name: str = "local channel",
    ) -> None:
        super().__init__(server)
        self.name = name
        self.roots = frozenset((os.getpid(), *roots))
        self.pids = None if pids is None else frozenset(pids)

    def entitled(self, pid: int) -> str | None:
        """See the class docstring."""
        if self.pids is not None:
            return None if pid in self.pids else f"pid {pid} is not one this channel admits"
        return default_entitlement(pid, self.roots)

    def submit(self, requests: Iterable[Request], errors: Iterable[str] = ()) -> None:
        """Apply ``requests`` now; each error string is logged as a rejection."""
        self.server._dispatch(self, list(requests), list(errors))

    def acquire(
        self,
        pid: int,
        scope: str,
        deadline: float,
        *,
        wall: bool = False,
        signal: int | None = None,
    ) -> None:
        """Arm ``(pid, scope)`` until ``deadline`` (the server clock's time, or wall time)."""
        op = Op.ACQUIRE_WALL if wall else Op.ACQUIRE
        self.submit([Request(op, pid, scope, deadline, signal)])

    def release(self, pid: int, scope: str) -> None:
        """Disarm ``(pid, scope)``."""
        self.submit([Request(Op.RELEASE, pid, scope, 0.0)])
