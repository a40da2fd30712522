"""The I/O plane: every blocking read and write the watchdog needs, kept off its loop.

The loop that kills must never wait on anything a worker, a disk or a terminal
controls.  So nothing on it writes a file or a terminal, or reads a file a
worker can touch; it hands that work to one of two places here:

- a ``Sink``: a writer thread fed by a queue bounded in bytes.  ``submit`` and
  ``write`` never block: when the consumer is slow (a stalled ``| tee``, Ctrl-S,
  a full disk, a FIFO nobody reads) the queue fills, and what does not fit is
  dropped and counted, with one warning per ``WARN_EVERY`` seconds.  A write
  that fails (``ENOSPC``, ``EIO``) costs its data and a warning, never the
  thread; a closed pipe (``EPIPE``) is reported once through ``on_broken``.
- ``run_blocking(fn, ...)``: a bounded blocking call (a ``/proc`` read, a dump
  file read, an incident written) in a small pool of threads of its own, so a
  call stuck for good (a hung NFS mount) costs a thread, never the loop, and
  never a thread of the loop's default executor that an application uses.

Why threads, not a second event loop or a helper process: the work is a handful
of blocking syscalls with little Python between them (a thread releases the GIL
in each), it needs no protocol of its own, and a helper process would be one
more thing to outlive the launcher.  Big CPU work in these threads (a JSON
document of megabytes) would hold the GIL against the loop, which is why every
input is bounded before it gets here (``MAX_DUMP_BYTES`` and friends).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import errno
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import BinaryIO, ParamSpec, TypeVar

from ._events import logger

__all__ = [
    "DEFAULT_BUDGET",
    "WARN_EVERY",
    "Sink",
    "FileSink",
    "SinkHandler",
    "StreamSink",
    "run_blocking",
]

#: Bytes a sink queues before it drops (enough for seconds of busy output).
DEFAULT_BUDGET = 8 << 20
#: Seconds between two warnings about the same sink's losses.
WARN_EVERY = 10.0
# Threads for run_blocking: enough that a few calls stuck for good leave the rest working.
_POOL_THREADS = 8

_P = ParamSpec("_P")
_T = TypeVar("_T")

_pool: concurrent.futures.ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _executor() -> concurrent.futures.ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = concurrent.futures.ThreadPoolExecutor(
                _POOL_THREADS, thread_name_prefix="aiotimer-io"
            )
        return _pool


async def run_blocking(fn: Callable[_P, _T], *args: _P.args, **kwargs: _P.kwargs) -> _T:
    """Run ``fn(*args, **kwargs)`` in the I/O plane's threads and await its result.

    Cancelling the await leaves the call running in its thread (a blocking
    syscall cannot be interrupted); bound the call itself, and the wait with a
    timeout.
    """
    loop = asyncio.get_running_loop()
    future = _executor().submit(lambda: fn(*args, **kwargs))
    return await asyncio.wrap_future(future, loop=loop)


class Sink:
    """A writer thread running queued jobs in order; the queue is bounded in bytes.

    ``submit(job, size)`` queues ``job`` (a callable doing blocking I/O) that
    carries ``size`` bytes; over ``budget`` it is dropped and counted instead.
    Jobs of size 0 (open, close) are never dropped.  ``name`` appears in the
    thread's name and in warnings.
    """

    def __init__(self, name: str, *, budget: int = DEFAULT_BUDGET) -> None:
        if budget <= 0:
            raise ValueError(f"`budget` must be a positive number of bytes, got {budget!r}")
        self.name = name
        self.budget = budget
        #: bytes and jobs dropped because the queue was full, and jobs that failed
        self.dropped_bytes = 0
        self.dropped_jobs = 0
        self.errors = 0
        self._queue: collections.deque[tuple[Callable[[], object], int]] = collections.deque()
        self._queued = 0
        self._cond = threading.Condition()
        self._closing = False
        self._idle = True
        self._warned_at = -WARN_EVERY
        self._unreported = 0
        self._thread = threading.Thread(target=self._run, name=f"aiotimer-{name}", daemon=True)
        self._thread.start()

    def __repr__(self) -> str:
        return f"<Sink {self.name} queued={self._queued} dropped={self.dropped_bytes}>"

    @property
    def queued(self) -> int:
        """Bytes waiting to be written."""
        return self._queued

    def submit(self, job: Callable[[], object], size: int = 0) -> bool:
        """Queue ``job``; ``False`` if it was dropped (the queue is full, or closed)."""
        with self._cond:
            if self._closing:
                return False
            if size and self._queued + size > self.budget:
                self.dropped_bytes += size
                self.dropped_jobs += 1
                self._unreported += size
                warn = self._should_warn()
            else:
                self._queue.append((job, size))
                self._queued += size
                self._cond.notify()
                return True
        if warn:
            self._warn_dropped()
        return False

    def _should_warn(self) -> bool:
        now = time.monotonic()
        if now - self._warned_at < WARN_EVERY:
            return False
        self._warned_at = now
        return True

    def _warn_dropped(self) -> None:
        with self._cond:
            lost, self._unreported = self._unreported, 0
        logger.warning(
            "%s is not keeping up: dropped %d bytes (%d in all so far); the watchdog goes on",
            self.name,
            lost,
            self.dropped_bytes,
        )

    def _failed(self, exc: BaseException) -> None:
        self.errors += 1
        with self._cond:
            warn = self._should_warn()
        if warn:
            logger.warning("%s: %s (%d failures so far; data lost)", self.name, exc, self.errors)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closing:
                    self._idle = True
                    self._cond.notify_all()
                    self._cond.wait()
                if not self._queue:  # closing, and everything is written
                    self._idle = True
                    self._cond.notify_all()
                    return
                self._idle = False
                job, size = self._queue.popleft()
            try:
                job()
            except Exception as exc:  # a sink outlives every failure of a job
                self._failed(exc)
            finally:
                with self._cond:
                    self._queued -= size

    def flush(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the queue to drain; whether it did.

        Blocks: call it from a thread, or once the loop has nothing left to do.
        """
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._queue or not self._idle:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        return True

    def close(self, timeout: float = 5.0) -> bool:
        """Accept nothing more; let what is queued be written for up to ``timeout`` seconds.

        Whether everything was written.  A consumer stalled for good keeps the
        thread (a daemon) and what it holds; the caller goes on.
        """
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._thread.join(timeout)
        done = not self._thread.is_alive()
        if self._unreported:
            self._warn_dropped()
        return done


class StreamSink(Sink):
    """A ``Sink`` writing bytes to a stream (a terminal, a pipe): ``write(data)``.

    ``on_broken()`` is called once, from the writer thread, when the stream's
    reader has gone (``EPIPE``); later writes are dropped without a word.
    """

    def __init__(
        self,
        name: str,
        stream: BinaryIO,
        *,
        budget: int = DEFAULT_BUDGET,
        on_broken: Callable[[], None] | None = None,
    ) -> None:
        self._stream = stream
        self._on_broken = on_broken
        self.broken = False
        super().__init__(name, budget=budget)

    def write(self, data: bytes) -> bool:
        """Queue ``data``; ``False`` if it was dropped."""
        if self.broken or not data:
            return False
        return self.submit(lambda: self._write(data), len(data))

    def _write(self, data: bytes) -> None:
        if self.broken:
            return
        try:
            self._stream.write(data)
            self._stream.flush()
        except (BrokenPipeError, ValueError):  # the reader left, or the stream was closed
            self._broke()
        except OSError as exc:
            if exc.errno == errno.EPIPE:
                self._broke()
            else:
                raise

    def _broke(self) -> None:
        if self.broken:
            return
        self.broken = True
        if self._on_broken is not None:
            self._on_broken()


class FileSink(Sink):
    """A ``Sink`` appending bytes to files, each opened (in the thread) on its first write.

    A file is opened with ``O_NOFOLLOW``: a symlink put where a log file goes
    is refused, not written through.  A failed open is retried on the next
    write (the disk may have room again).
    """

    def __init__(self, name: str, *, budget: int = DEFAULT_BUDGET) -> None:
        self._files: dict[str, int] = {}
        super().__init__(name, budget=budget)

    def append(self, path: str | os.PathLike[str], data: bytes) -> bool:
        """Queue ``data`` for the end of ``path``; ``False`` if it was dropped."""
        where = os.fspath(path)
        return self.submit(lambda: self._append(where, data), len(data))

    def open_file(self, path: str | os.PathLike[str]) -> None:
        """Create ``path`` now (empty if nothing is written to it), in the writer thread."""
        where = os.fspath(path)
        self.submit(lambda: self._open(where))

    def close_file(self, path: str | os.PathLike[str]) -> None:
        """Close ``path`` once what is queued for it is written."""
        where = os.fspath(path)
        self.submit(lambda: self._close(where))

    def _open(self, path: str) -> int:
        fd = self._files.get(path)
        if fd is None:
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW
            fd = self._files[path] = os.open(path, flags, 0o644)
        return fd

    def _append(self, path: str, data: bytes) -> None:
        fd = self._open(path)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]

    def _close(self, path: str) -> None:
        fd = self._files.pop(path, None)
        if fd is not None:
            os.close(fd)

    def _close_all(self) -> None:
        for path in list(self._files):
            self._close(path)

    def close(self, timeout: float = 5.0) -> bool:
        """As ``Sink.close``, and every file this sink opened is closed."""
        self.submit(self._close_all)
        return super().close(timeout)


class SinkHandler(logging.Handler):
    """A logging handler that never blocks: each record, formatted, goes to a ``StreamSink``.

    Like the standard library's ``QueueHandler``, but bounded: a record that
    does not fit is dropped and counted by the sink.
    """

    def __init__(self, sink: StreamSink, level: int = logging.NOTSET) -> None:
        super().__init__(level)
        self.sink = sink

    def emit(self, record: logging.LogRecord) -> None:
        """Format ``record`` and queue it."""
        try:
            self.sink.write((self.format(record) + "\n").encode(errors="replace"))
        except Exception:
            self.handleError(record)
