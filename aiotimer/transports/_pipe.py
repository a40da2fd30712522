"""A spawned worker's request pipe: an inherited fd the worker (and its children) write."""

from __future__ import annotations

import asyncio
import os
from typing import TYPE_CHECKING

from .._channel import Channel, RequestSink
from .._events import logger
from .._linux import descends_from, holds_pipe, process_uid
from .._protocol import FrameDecoder

if TYPE_CHECKING:
    from .._processes import SpawnedTree

__all__ = ["PipeChannel"]

# A read's worth of frames is decoded in one callback: at most about 200
# requests, a fraction of a millisecond, so one busy worker cannot hold back
# another's kill for longer (the dispatcher lets a passed deadline go first
# after each batch).  Measured (16 workers flooding, 2 cores): 4 KiB reads
# give about 170k pairs/s and a bystander's kill within ~1 ms; 64 KiB reads
# (decoded 4 KiB at a time) 200k pairs/s, but the drained flooders then take
# more of the CPU and a bystander's kill was up to 4 ms late.
_READ_SIZE = 4 * 1024


class PipeChannel(Channel):
    """Reads one worker's pipe on the loop; non-blocking, no thread.

    Requests may come from the worker or from any of its descendants (they
    inherit the fd); a pid outside that tree is refused, unless it holds the
    pipe itself (a descendant re-parented when its parent exited).  End of file means
    every writer has exited or closed the fd; the timers armed through the
    pipe stay armed until their processes exit (a worker that closes its pipe
    and then hangs is still killed).
    """

    def __init__(
        self,
        sink: RequestSink,
        spawned: SpawnedTree,
        read_fd: int,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        super().__init__(sink)
        self.spawned: SpawnedTree = spawned
        self.name = f"pipe of worker {spawned.pid}"
        self._fd = read_fd
        self._loop = loop
        self._decoder = FrameDecoder()
        self._inode = os.fstat(read_fd).st_ino
        os.set_blocking(read_fd, False)
        loop.add_reader(read_fd, self._readable)

    def entitled(self, pid: int) -> str | None:
        """The worker itself, a process descending from it, or one holding this pipe.

        The last covers a worker's descendant whose parent exited: it was
        re-parented (to init, or to ``aiotimer run``, a subreaper) and no longer
        descends from the worker, but it still holds the pipe it inherited.
        """
        root = self.spawned.pid
        if pid == root or descends_from(pid, {root}):
            return None
        if process_uid(pid) == os.getuid() and holds_pipe(pid, self._inode):
            return None
        return (
            f"pid {pid} is not worker {root}, one of its descendants, or a process holding its pipe"
        )

    @property
    def closed(self) -> bool:
        """Whether the pipe has been closed."""
        return self._fd < 0

    def _readable(self) -> None:
        try:
            data = os.read(self._fd, _READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            logger.error("reading %s failed: %s; closing it", self.name, exc)
            data = b""
        if not data:
            if self._decoder.pending:
                logger.warning(
                    "%s closed with %d bytes of an incomplete frame; dropped",
                    self.name,
                    self._decoder.pending,
                )
            self.close()
            self.sink.channel_closed(self)
            return
        requests, errors = self._decoder.feed(data)
        self.sink.dispatch(self, requests, errors)

    def close(self) -> None:
        """Stop reading and close the read end."""
        if self._fd >= 0:
            self._loop.remove_reader(self._fd)
            os.close(self._fd)
            self._fd = -1
