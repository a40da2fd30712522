"""torch's ``LocalTimerClient`` transport: pickled ``TimerRequest``s on a ``multiprocessing.Queue``.

The queue's pipe is watched on the loop; when it turns readable, the requests
waiting are taken with non-blocking gets, in order, a bounded batch per
callback.  No thread, no polling.

What the queue's protocol cannot protect against, and what is done about it:

- Every item is unpickled, and a pickle can run code or raise anything
  (``SystemExit`` included): each item's failure is caught and rejected alone.
  Any process that can put on the queue can run code in the server; that is
  inherent to torch's ``LocalTimerClient`` (see docs/security.md).
- The pipe is read non-blocking: a message cut short (a writer killed in the
  middle of a write larger than ``PIPE_BUF``, or bytes written by hand) is
  rejected instead of blocking the server's loop for ever.
- ``put`` takes the queue's write lock in the client's feeder thread.  A client
  killed while it held the lock (a multi-threaded worker SIGKILLed on expiry)
  would leave every other client's requests stuck behind it.  When a client of
  the queue exits, the bridge checks the lock; if it stays held for
  ``STUCK_LOCK_AFTER`` seconds, it is released, with a loud log line.  That is
  safe for torch's requests: a message up to ``PIPE_BUF`` bytes is one atomic
  write, so two writers never interleave within one.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import multiprocessing.queues
import os
import queue as _queue
from collections.abc import Iterable
from typing import Any

from .._channel import Channel, Host, RequestSink
from .._events import logger
from .._processes import foreign_descendant_of
from .._protocol import Op, Request

__all__ = ["QueueBridge", "bridge_queue", "request_from_torch"]

# Bound the work done in one loop callback, so a flood cannot hold back a kill.
_BATCH = 256
#: How long the queue's write lock may stay held after a client died before it is released.
STUCK_LOCK_AFTER = 1.0
_LOCK_CHECKS = 5


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
        # The lock every put() takes in its feeder thread (None on platforms without one).
        self._write_lock: Any = getattr(mp_queue, "_wlock", None)
        self._checking_lock = False

    def entitled(self, pid: int) -> str | None:
        """A process of this user descending from the server or a root; never the server."""
        return foreign_descendant_of(pid, self.roots)

    def open(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start watching the queue's pipe."""
        # multiprocessing exposes no public readiness hook; its reader end is
        # the one pipe every put() lands in.
        self._fd = self.queue._reader.fileno()  # type: ignore[attr-defined]
        # A truncated message must not block the loop: it is rejected instead.
        os.set_blocking(self._fd, False)
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
            except BlockingIOError:
                errors.append(
                    "a message cut short on the queue (a client killed in the middle of a "
                    "write?); what follows may be out of step"
                )
                break
            except BaseException as exc:
                errors.append(f"unreadable queue item: {exc!r}"[:300])
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

    def process_exited(self, pid: int) -> None:
        """A client of the queue exited: make sure it did not die holding the write lock."""
        if self._write_lock is None or self._checking_lock or self._loop is None:
            return
        self._checking_lock = True
        self._check_lock(pid, _LOCK_CHECKS)

    def _check_lock(self, pid: int, checks_left: int) -> None:
        lock = self._write_lock
        if lock.acquire(False):  # free: nobody died holding it
            lock.release()
            self._checking_lock = False
            return
        if checks_left > 0 and self._loop is not None and self._fd >= 0:
            self._loop.call_later(
                STUCK_LOCK_AFTER / _LOCK_CHECKS, self._check_lock, pid, checks_left - 1
            )
            return
        self._checking_lock = False
        if self._fd < 0:
            return
        logger.error(
            "the write lock of %s has been held for %gs since its client pid %d exited: it "
            "died holding it, and every other client's requests would wait behind it for "
            "ever; releasing the lock",
            self.name,
            STUCK_LOCK_AFTER,
            pid,
        )
        with contextlib.suppress(ValueError):  # released in the meantime after all
            lock.release()

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
