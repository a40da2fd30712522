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
import contextlib
import ctypes
import errno
import fcntl
import math
import os
import stat
import sys
import termios
from collections.abc import Callable, Iterable
from pathlib import Path

from .._events import logger
from .._linux import inotify_names, inotify_watch_dir
from .._processes import foreign_descendant_of
from .._protocol import JsonLineDecoder
from ._base import Channel, Host, RequestSink

__all__ = ["FifoListener", "check_fifo_path", "listen_fifo"]

# A read's worth of lines is decoded in one callback: about 70 torch requests,
# a fraction of a millisecond, so a flood cannot hold back a kill for longer.
_READ_SIZE = 8 * 1024
# How many ``<path>.displaced-<n>`` names are tried (each one syscall) before a
# thing in the FIFO's place is removed instead: names left by earlier servers,
# or planted, are skipped, never replaced.
_DISPLACED_NAMES = 64


def check_fifo_path(path: str | os.PathLike[str], name: str = "file_path") -> bool:
    """Whether a FIFO of this user exists at ``path``; ``FileExistsError`` if something else does.

    A path that exists and is not a FIFO is never replaced (torch deletes it),
    nor is another user's FIFO: it is theirs, and in a sticky directory such as
    /tmp it could not be removed anyway.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    if not stat.S_ISFIFO(st.st_mode):
        raise FileExistsError(
            f"`{name}` {os.fspath(path)!r} exists and is not a FIFO; refusing to replace it"
        )
    if st.st_uid != os.geteuid():
        raise FileExistsError(
            f"`{name}` {os.fspath(path)!r} is a FIFO of another user (uid {st.st_uid}); "
            "refusing to replace it"
        )
    return True


def _describe(st: os.stat_result) -> str:
    """What a file is, for a log line: 'a symlink of uid 65534'."""
    mode = st.st_mode
    if stat.S_ISREG(mode):
        kind = "a regular file"
    elif stat.S_ISLNK(mode):
        kind = "a symlink"
    elif stat.S_ISDIR(mode):
        kind = "a directory"
    elif stat.S_ISFIFO(mode):
        kind = "another FIFO"
    elif stat.S_ISSOCK(mode):
        kind = "a socket"
    else:
        kind = "a device"
    return kind if st.st_uid == os.geteuid() else f"{kind} of uid {st.st_uid}"


def _renameat2_api() -> Callable[[int, bytes, int, bytes, int], int] | None:
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # a libc without it (glibc < 2.28, musl < 1.2.5)
        return None
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p]
    renameat2.argtypes += [ctypes.c_uint]
    renameat2.restype = ctypes.c_int
    return renameat2


_RENAMEAT2 = _renameat2_api()
_AT_FDCWD = -100
_RENAME_NOREPLACE = 1


def _rename_noreplace(src: str, dst: str) -> None:
    """Rename the name ``src`` to ``dst``; ``FileExistsError`` if ``dst`` exists.

    A rename acts on the name itself: a symlink is renamed, never its target,
    and nothing is opened.  ``dst`` is never replaced: whatever is there (an
    earlier server's leftover, or something planted) is someone's.
    """
    if _RENAMEAT2 is not None:
        if _RENAMEAT2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE):
            err = ctypes.get_errno()
            if err not in (errno.EINVAL, errno.ENOSYS):
                raise OSError(err, os.strerror(err), src, None, dst)
        else:
            return
    # The kernel or filesystem cannot refuse to replace: check first.  Only a
    # name created in the microseconds between could be replaced, by a rename
    # in a directory where its creator is racing us on purpose.
    try:
        os.lstat(dst)
    except FileNotFoundError:
        os.rename(src, dst)
        return
    raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), dst)


class FifoListener(Channel):
    """Serves torch ``FileTimerClient`` requests arriving on the FIFO at ``path``.

    Create it with ``await listen_fifo(server, path)``; it closes with the server.
    """

    # torch's clients send bare pids and no greeting: a known pid is re-checked.
    revalidate = True
    #: seconds between two warnings that the path was taken; the ones between are
    #: counted and said in one line at the period's end (an attacker replacing it
    #: in a loop costs a line a minute, not a line per replacement)
    warn_period = 60.0

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
        self._watch_fd = -1
        self._inode: tuple[int, int] | None = None
        self._decoder = JsonLineDecoder()
        self._loop: asyncio.AbstractEventLoop | None = None
        #: times the path was found removed or replaced by something else while serving
        self.replaced = 0
        #: things found in the FIFO's place and moved aside (renamed) or, failing that, removed
        self.displaced = 0
        self._displaced_seq = 0  # the last n of a ``<path>.displaced-<n>`` name tried
        # The rate limit of the warnings (on the loop's clock: a mock server clock
        # need not move for a warning to be said).
        self._warned_at = -math.inf
        self._unsaid = 0
        self._last_unsaid = ""
        self._unsaid_handle: asyncio.TimerHandle | None = None

    def entitled(self, pid: int) -> str | None:
        """A process of this user descending from the server or a root; never the server."""
        return foreign_descendant_of(pid, self.roots)

    def open(self, loop: asyncio.AbstractEventLoop) -> None:
        """Create the FIFO and start reading it (returns once clients can connect)."""
        self._loop = loop
        if check_fifo_path(self.path):
            os.unlink(self.path)  # a FIFO left behind by an earlier server: replace it
        self._create()
        self._watch_fd = inotify_watch_dir(self.path.parent)
        if self._watch_fd >= 0:
            loop.add_reader(self._watch_fd, self._directory_changed)
        else:
            logger.warning("cannot watch %s: a FIFO removed under us goes unnoticed", self.path)
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
        # bigger one only queues what the server cannot process yet, and a
        # release could wait there past its deadline (at 1 MiB, ~0.4 s behind
        # 16 flooding clients on 2 cores), while those clients, which raise
        # when it is full, failed about as often (227k vs 232k times in 3 s).
        self._read_fd, self._write_fd = read_fd, write_fd
        self._inode = (st.st_dev, st.st_ino)
        self._loop.add_reader(read_fd, self._readable)

    def unread_bytes(self) -> int:
        """Bytes clients wrote to the FIFO that it has not read yet."""
        if self._read_fd < 0:
            return 0
        unread = fcntl.ioctl(self._read_fd, termios.FIONREAD, bytes(4))  # a C int
        return int.from_bytes(unread, sys.byteorder)

    def _directory_changed(self) -> None:
        try:
            data = os.read(self._watch_fd, 64 * 1024)
        except (BlockingIOError, InterruptedError):
            return
        names = inotify_names(data)
        # b"": the event queue overflowed (an event about our name may be lost).
        if os.fsencode(self.path.name) in names or b"" in names:
            self._check_still_ours()

    def _check_still_ours(self) -> None:
        """Make the path our FIFO again if it was removed or replaced: a few syscalls.

        Nothing at the path is opened or followed: what took its place is
        renamed aside (a symlink itself, never its target), or removed if it
        cannot be renamed, and a FIFO made as at start.
        """
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            found = None
        else:
            if (st.st_dev, st.st_ino) == self._inode:
                return  # an event about our own rename or mkfifo, or a name reused
            found = st
        self.replaced += 1
        if found is None:
            what = f"{self.path} was removed while serving"
            lost = ""
        else:
            what = f"{self.path} was replaced by {_describe(found)} while serving"
            try:
                aside = self._move_aside(found)
            except OSError as exc:
                self._warn(
                    f"{what}, and it cannot be moved aside or removed ({exc.strerror}): "
                    "torch clients cannot reach this server until it is"
                )
                return
            what += f"; moved it aside to {aside}" if aside else "; removed it"
            lost = " (what clients wrote into it is lost)"
        old_read, old_write = self._read_fd, self._write_fd
        try:
            self._create()
        except OSError as exc:
            # Taken again in between: that is another event, handled in turn.
            self._warn(f"{what}; could not create the FIFO again: {exc}")
            return
        self._warn(f"{what}; created the FIFO again{lost}")
        # What clients wrote to our old FIFO is still read, once.
        self._drain(old_read)
        self._close_fds(old_read, old_write)

    def _move_aside(self, found: os.stat_result) -> str | None:
        """Rename what is at the path to a free ``<path>.displaced-<n>``; its new name.

        ``None``: it could not be renamed and was removed instead (a file or
        symlink), or it went away meanwhile.  ``OSError`` if it is still there.
        """
        path = os.fspath(self.path)
        try:
            for _ in range(_DISPLACED_NAMES):
                self._displaced_seq += 1
                aside = f"{path}.displaced-{self._displaced_seq}"
                try:
                    _rename_noreplace(path, aside)
                except FileExistsError:
                    continue
                self.displaced += 1
                return aside
            raise FileExistsError(errno.EEXIST, "every name to move it to is taken", path)
        except FileNotFoundError:
            return None  # gone already: the path is free
        except OSError:
            if stat.S_ISDIR(found.st_mode):
                raise  # a directory, maybe full of someone's files: never removed
            try:
                os.unlink(path)  # the name, not what a symlink points to
            except FileNotFoundError:
                return None
            self.displaced += 1
            return None

    def _warn(self, message: str) -> None:
        """Log ``message`` as a warning, at most once per ``warn_period``; sum up the rest."""
        assert self._loop is not None
        now = self._loop.time()
        if now - self._warned_at >= self.warn_period:
            self._warned_at = now
            logger.warning("%s", message)
            return
        self._unsaid += 1
        self._last_unsaid = message
        if self._unsaid_handle is None:
            self._unsaid_handle = self._loop.call_at(
                self._warned_at + self.warn_period, self._say_unsaid
            )

    def _say_unsaid(self) -> None:
        self._unsaid_handle = None
        if not self._unsaid:
            return
        logger.warning(
            "%s was removed or replaced %d more times in the last %gs; the last: %s",
            self.path,
            self._unsaid,
            self.warn_period,
            self._last_unsaid,
        )
        self._unsaid = 0
        assert self._loop is not None
        self._warned_at = self._loop.time()

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
        self._close_fds(self._read_fd, self._write_fd, self._watch_fd)
        self._read_fd = self._write_fd = self._watch_fd = -1
        if self._unsaid_handle is not None:
            self._unsaid_handle.cancel()
            self._say_unsaid()
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
    requests, besides the server's own descendants.  Raises ``FileExistsError``
    if something that is not a FIFO is at ``path``, ``FileNotFoundError`` if its
    directory does not exist.
    """
    loop = server.running_loop()
    listener = FifoListener(server.sink, path, roots=roots, mode=mode)
    listener.open(loop)
    server.add_listener(listener)
    return listener
