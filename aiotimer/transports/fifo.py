"""torch's ``FileTimerClient`` transport: JSON lines on a named pipe, read on the loop.

Differences from torch's ``FileTimerServer``, all on purpose:

- the FIFO is read as it becomes readable (no polling interval), and the server
  keeps a write end open itself, so the last client closing never makes the
  reader see end-of-file and spin;
- each line is decoded on its own: a bad line is rejected with a logged reason
  and loses nothing else;
- the FIFO is created with mode 0600 (by default), a path that exists and is not
  a FIFO is refused, never deleted, and the FIFO is removed on close;
- its buffer is enlarged (up to ``/proc/sys/fs/pipe-max-size``), so bursts of
  requests do not fail in the clients' non-blocking writes;
- a request may only name a process of this user that descends from the server
  or from a configured root (the torchrun agent, say), never the server itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import stat
from collections.abc import Iterable
from pathlib import Path

from .._events import logger
from .._exceptions import ProtocolError
from .._processes import foreign_descendant_of
from .._protocol import JSON_LINE_MAX, Request, decode_json_line
from ._base import Channel, Host, RequestSink

__all__ = ["FifoListener", "check_fifo_path", "listen_fifo"]

_READ_SIZE = 1024 * 1024


def check_fifo_path(path: str | os.PathLike[str], name: str = "file_path") -> bool:
    """Whether a FIFO exists at ``path``; ``FileExistsError`` if something else does.

    A path that exists and is not a FIFO is never replaced (torch deletes it).
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    if not stat.S_ISFIFO(st.st_mode):
        raise FileExistsError(
            f"`{name}` {os.fspath(path)!r} exists and is not a FIFO; refusing to replace it"
        )
    return True


def _pipe_max_size() -> int:
    try:
        return int(Path("/proc/sys/fs/pipe-max-size").read_text())
    except (OSError, ValueError):
        return 1024 * 1024


class FifoListener(Channel):
    """Serves torch ``FileTimerClient`` requests arriving on the FIFO at ``path``.

    Create it with ``await listen_fifo(server, path)``; it closes with the server.
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
        self._inode: tuple[int, int] | None = None
        self._partial = b""
        self._discarding = False
        self._loop: asyncio.AbstractEventLoop | None = None

    def entitled(self, pid: int) -> str | None:
        """A process of this user descending from the server or a root; never the server."""
        return foreign_descendant_of(pid, self.roots)

    def open(self, loop: asyncio.AbstractEventLoop) -> None:
        """Create the FIFO and start reading it (returns once clients can connect)."""
        if check_fifo_path(self.path):
            os.unlink(self.path)  # a FIFO left behind by an earlier server: replace it
        os.mkfifo(self.path, self._mode)
        os.chmod(self.path, self._mode)  # mkfifo applies the umask
        self._read_fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        # Our own writer: clients come and go, and with none left a reader sees
        # end-of-file on every read and would spin.
        self._write_fd = os.open(self.path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        st = os.fstat(self._read_fd)
        self._inode = (st.st_dev, st.st_ino)
        with contextlib.suppress(OSError):
            fcntl.fcntl(self._read_fd, fcntl.F_SETPIPE_SZ, _pipe_max_size())
        self._loop = loop
        loop.add_reader(self._read_fd, self._readable)
        logger.info("listening for torch timer requests on %s", self.path)

    def _readable(self) -> None:
        try:
            data = os.read(self._read_fd, _READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        if not data:
            return
        requests, errors = self._decode(data)
        self.sink.dispatch(self, requests, errors)

    def _decode(self, data: bytes) -> tuple[list[Request], list[str]]:
        requests: list[Request] = []
        errors: list[str] = []
        lines = data.split(b"\n")
        lines[0] = self._partial + lines[0]
        self._partial = lines.pop()
        for line in lines:
            if self._discarding:
                # The tail of a line already rejected as oversize.
                self._discarding = False
                continue
            if not line.strip():
                continue
            try:
                requests.append(decode_json_line(line))
            except ProtocolError as exc:
                errors.append(f"{exc}: {line[:200]!r}")
        if len(self._partial) > JSON_LINE_MAX:
            if not self._discarding:
                errors.append(f"line longer than {JSON_LINE_MAX} bytes; discarded")
            self._partial = b""
            self._discarding = True
        return requests, errors

    def close(self) -> None:
        """Stop reading, close the FIFO and remove it (if it is still ours)."""
        if self._read_fd >= 0:
            if self._loop is not None:
                self._loop.remove_reader(self._read_fd)
            os.close(self._read_fd)
            self._read_fd = -1
        if self._write_fd >= 0:
            os.close(self._write_fd)
            self._write_fd = -1
        if self._inode is not None:
            with contextlib.suppress(FileNotFoundError):
                st = os.lstat(self.path)
                if (st.st_dev, st.st_ino) == self._inode:
                    os.unlink(self.path)
            self._inode = None

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
    requests, besides the server's own descendants.
    """
    loop = server.running_loop()
    listener = FifoListener(server.sink, path, roots=roots, mode=mode)
    listener.open(loop)
    server.add_listener(listener)
    return listener
