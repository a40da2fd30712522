"""torch's ``LocalTimerClient`` transport: pickled ``TimerRequest``s on a ``multiprocessing.Queue``.

The queue's pipe is watched on the loop; when it turns readable, every request
waiting is taken with non-blocking gets, in order.  No thread, no polling.
"""

from __future__ import annotations

import asyncio
import math
import multiprocessing.queues
import os
import queue as _queue
from collections.abc import Iterable
from typing import Any

from .._events import logger
from .._processes import foreign_descendant_of
from .._protocol import Op, Request
from ._base import Channel, Host, RequestSink

__all__ = ["QueueBridge", "bridge_queue", "request_from_torch"]

# Bound the work done in one loop callback, so a flood cannot starve the loop.
_BATCH = 4096


def request_from_torch(item: Any) -> Request:
    """Convert a torch ``TimerRequest`` (or anything with its three fields) to a ``Request``."""
    pid = getattr(item, "worker_id", None)
    scope = getattr(item, "scope_id", None)
    expiration = getattr(item, "expiration_time", None)
    if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 0:
        raise ValueError(f"worker_id must be a pid > 0, got {pid!r}")
    if not isinstance(scope, str):
        raise ValueError(f"scope_id must be a str, got {scope!r}")
    if isinstance(expiration, bool) or not isinstance(expiration, (int, float)):
        raise ValueError(f"expiration_time must be a number, got {expiration!r}")
    if not math.isfinite(expiration):
        raise ValueError(f"expiration_time must be finite, got {expiration!r}")
    if expiration < 0:
        return Request(Op.RELEASE, pid, scope, 0.0)
    return Request(Op.ACQUIRE_WALL, pid, scope, float(expiration))


class QueueBridge(Channel):
    """Feeds a server from a ``multiprocessing.Queue`` that torch clients ``put`` to."""

    # torch's clients send bare pids and no greeting: a known pid is re-checked.
    revalidate = True

    def __init__(
        self,
        sink: RequestSink,
        mp_queue: multiprocessing.queues.Queue[Any],
        *,
        roots: Iterable[int] = (),
    ) -> None:
        super().__init__(sink)
        self.name = "multiprocessing queue"
        self.queue = mp_queue
        self.roots = frozenset((os.getpid(), *roots))
        self._fd = -1
        self._loop: asyncio.AbstractEventLoop | None = None

    def entitled(self, pid: int) -> str | None:
        """A process of this user descending from the server or a root; never the server."""
        return foreign_descendant_of(pid, self.roots)

    def open(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start watching the queue's pipe."""
        # multiprocessing exposes no public readiness hook; its reader end is
        # the one pipe every put() lands in.
        self._fd = self.queue._reader.fileno()  # type: ignore[attr-defined]
        self._loop = loop
        loop.add_reader(self._fd, self._readable)
        self._readable()  # requests put before we started

    def _readable(self) -> None:
        requests: list[Request] = []
        errors: list[str] = []
        for _ in range(_BATCH):
            try:
                item = self.queue.get_nowait()
            except _queue.Empty:
                break
            except Exception as exc:  # an unpicklable or truncated message
                errors.append(f"unreadable queue item: {exc!r}")
                continue
            try:
                requests.append(request_from_torch(item))
            except ValueError as exc:
                errors.append(f"{exc}: {item!r}"[:300])
        else:
            assert self._loop is not None
            self._loop.call_soon(self._readable)  # more waiting; let others run first
        if requests or errors:
            self.sink.dispatch(self, requests, errors)

    def close(self) -> None:
        """Stop watching the queue (the queue itself belongs to the caller)."""
        if self._fd >= 0 and self._loop is not None:
            self._loop.remove_reader(self._fd)
            self._fd = -1
            logger.debug("stopped reading %s", self.name)

    async def aclose(self) -> None:
        """``close()``, for the server's listener protocol."""
        self.close()


async def bridge_queue(
    server: Host,
    mp_queue: multiprocessing.queues.Queue[Any],
    *,
    roots: Iterable[int] = (),
) -> QueueBridge:
    """Serve torch ``LocalTimerClient`` requests put on ``mp_queue``."""
    loop = server.running_loop()
    bridge = QueueBridge(server.sink, mp_queue, roots=roots)
    bridge.open(loop)
    server.add_listener(bridge)
    return bridge
