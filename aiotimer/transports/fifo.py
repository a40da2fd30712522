"""torch's ``FileTimerClient`` transport: JSON lines on a named pipe, read on the loop.

Differences from torch's ``FileTimerServer``, all on purpose:

- the FIFO is read as it becomes readable (no polling interval), in bounded
  reads, so a flood of requests never holds back a kill for long; the server
  keeps a write end open itself, so the last client closing never makes the
  reader see end-of-file and spin;
- each line is decoded on its own: a bad line is rejected with a logged reason
  and loses nothing else;
- the FIFO is created with mode 0600 (by default), set on the open FIFO itself
  (never through a path a symlink could be swapped into); a path that exists
  at start and is not a FIFO of this user is refused, never deleted, and the
  FIFO is removed on close;
- the path stays ours while serving (inotify on its directory): if our FIFO is
  removed, it is created again; if anything else takes its place (a regular
  file, a symlink, a directory, another FIFO), that is moved aside, never
  followed or opened, to ``<path>.displaced-<n>``, and the FIFO is created
  again, with a rate-limited warning.  Otherwise torch clients would write
  into a file (their hangs unkilled) or through a symlink to another user;
- its buffer keeps the kernel's default size (64 KiB), as torch's: a bigger one
  only queues requests the server cannot process yet, a release among them
  past its deadline;
- a request may only name a process of this user that descends from the server
  or from a configured root (the torchrun agent, say), never the server itself.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import stat
import sys
import termios
from collections.abc import Iterable
from pathlib import Path

from .._channel import Channel, Host, RequestSink
from .._events import logger
from .._processes import foreign_descendant_of
from .._protocol import JsonLineDecoder
from ._paths import GuardedPath, PathGuard, existing_of_ours

__all__ = ["FifoListener", "check_fifo_path", "listen_fifo"]

# A read's worth of lines is decoded in one callback: about 70 torch requests,
# a fraction of a millisecond, so a flood cannot hold back a kill for longer.
_READ_SIZE = 8 * 1024


def check_fifo_path(path: str | os.PathLike[str], name: str = "file_path") -> bool:
    """Whether a FIFO of this user exists at ``path``; ``FileExistsError`` if something else does.

    A path that exists and is not a FIFO is never replaced (torch deletes it),
    nor is another user's FIFO: it is theirs, and in a sticky directory such as
    /tmp it could not be removed anyway.
    """
    return existing_of_ours(path, name, stat.S_ISFIFO, "a FIFO")


class FifoListener(GuardedPath, Channel):
    """Serves torch ``FileTimerClient`` requests arriving on the FIFO at ``path``.

    Create it with ``await listen_fifo(server, path)``; it closes with the server.
    The path stays its own while it serves (``_paths.PathGuard``).
    """

    # torch's clients send bare pids and no greeting: a known pid is re-checked.
    revalidate = True

    def __init__(
        self,
        sink: RequestSink,
        path: str | os.PathLike[str],
        *,
        roots: Iterable[int] = (),
        mode: int = 0o600,
    ) -> None:
        super().__init__(sink)
        self.path = Path(path)
        self.name = f"FIFO {self.path}"
        self.roots = frozenset((os.getpid(), *roots))
        self._mode = mode
        self._read_fd = -1
        self._write_fd = -1
        self._decoder = JsonLineDecoder()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._guard = PathGuard(
            self.path, "FIFO", self._recreate, lost=" (what clients wrote into it is lost)"
        )

    @property
    def warn_period(self) -> float:
        """Seconds between two warnings that the path was taken (the rest are summed up):
        an attacker replacing it in a loop costs a line a minute, not one per replacement."""
        return self._guard.warn_period

    @warn_period.setter
    def warn_period(self, seconds: float) -> None:
        self._guard.warn_period = seconds

    def entitled(self, pid: int) -> str | None:
        """A process of this user descending from the server or a root; never the server."""
        return foreign_descendant_of(pid, self.roots)

    def open(self, loop: asyncio.AbstractEventLoop) -> None:
        """Create the FIFO and start reading it (returns once clients can connect)."""
        self._loop = loop
        if check_fifo_path(self.path):
            os.unlink(self.path)  # a FIFO left behind by an earlier server: replace it
        self._create()
        self._guard.start(loop)
        logger.info("listening for torch timer requests on %s", self.path)

    def _create(self) -> None:
        """Make the FIFO, open both ends, and start reading it."""
        assert self._loop is not None
        os.mkfifo(self.path, self._mode)
        # O_NOFOLLOW: a symlink swapped in after mkfifo is refused, not followed.
        read_fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOFOLLOW)
        try:
            st = os.fstat(read_fd)
            if not stat.S_ISFIFO(st.st_mode) or st.st_uid != os.geteuid():
                raise FileExistsError(f"{str(self.path)!r} was replaced while it was created")
            os.fchmod(read_fd, self._mode)  # mkfifo applied the umask; the fd is the FIFO itself
            # Our own writer: clients come and go, and with none left a reader
            # sees end-of-file on every read and would spin.
            write_fd = os.open(
                f"/proc/self/fd/{read_fd}", os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC
            )
        except BaseException:
            os.close(read_fd)
            raise
        # The FIFO keeps the kernel's default size (64 KiB, as torch's): a
        # bigger one only queues requests the server cannot process yet, and a
        # release could wait there past its deadline (at 1 MiB, ~0.4 s behind
        # 16 flooding clients on 2 cores), while those clients, which raise
        # when it is full, failed about as often (227k vs 232k times in 3 s).
        self._read_fd, self._write_fd = read_fd, write_fd
        self._guard.inode = (st.st_dev, st.st_ino)
        self._loop.add_reader(read_fd, self._readable)

    def _recreate(self) -> None:
        """The path was taken or removed (and is free now): make the FIFO again.

        What clients wrote to the old FIFO is still read, once.
        """
        old_read, old_write = self._read_fd, self._write_fd
        self._create()
        self._drain(old_read)
        self._close_fds(old_read, old_write)

    def unread_bytes(self) -> int:
        """Bytes clients wrote to the FIFO that it has not read yet."""
        if self._read_fd < 0:
            return 0
        unread = fcntl.ioctl(self._read_fd, termios.FIONREAD, bytes(4))  # a C int
        return int.from_bytes(unread, sys.byteorder)

    def _drain(self, fd: int) -> None:
        while True:
            try:
                data = os.read(fd, _READ_SIZE)
            except (BlockingIOError, InterruptedError, OSError):
                return
            if not data:
                return
            self._deliver(data)

    def _readable(self) -> None:
        try:
            data = os.read(self._read_fd, _READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        if data:
            self._deliver(data)

    def _deliver(self, data: bytes) -> None:
        requests, errors = self._decoder.feed(data)
        self.sink.dispatch(self, requests, errors)

    def _close_fds(self, *fds: int) -> None:
        for fd in fds:
            if fd < 0:
                continue
            if self._loop is not None:
                self._loop.remove_reader(fd)
            os.close(fd)

    def close(self) -> None:
        """Stop reading, close the FIFO and remove it (if it is still ours)."""
        self._close_fds(self._read_fd, self._write_fd)
        self._read_fd = self._write_fd = -1
        self._guard.close()
        self._guard.remove()

    async def aclose(self) -> None:
        """``close()``, for the server's listener protocol."""
        self.close()


async def listen_fifo(
    server: Host,
    path: str | os.PathLike[str],
    *,
    roots: Iterable[int] = (),
    mode: int = 0o600,
) -> FifoListener:
    """Serve torch ``FileTimerClient`` requests on a new FIFO at ``path``.

    ``roots``: pids (a torchrun agent, say) whose descendants may be named in
    requests, besides the server's own descendants.  Raises ``FileExistsError``
    if something that is not a FIFO is at ``path``, ``FileNotFoundError`` if its
    directory does not exist.
    """
    loop = server.running_loop()
    listener = FifoListener(server.sink, path, roots=roots, mode=mode)
    listener.open(loop)
    server.add_listener(listener)
    return listener
