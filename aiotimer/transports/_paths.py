"""Keeping a listener's path ours while serving: shared by the FIFO and the socket.

A listener (torch's FIFO, aiotimer's socket) lives at a name in a directory.
While it serves, the name must stay its own: if the FIFO or socket is removed,
clients cannot reach the server; if something else takes its place (a regular
file, a symlink, a directory, another FIFO or socket), clients would write into
it, or through a symlink to someone else, and their hangs go unkilled.

``PathGuard`` watches the directory with inotify (no polling) and, when the
name changes, makes it the listener's again in a few syscalls: nothing at the
path is opened or followed; what took its place is renamed aside to
``<path>.displaced-<n>`` (a symlink itself, never its target; a taken name
skipped, never replaced), or removed if it cannot be renamed (a directory never
is), and the listener creates its FIFO or socket again.  Warnings about it are
rate-limited: an attacker replacing the name in a loop costs a line a minute.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import math
import os
import stat
from collections.abc import Callable
from pathlib import Path

from .._events import logger
from .._linux import inotify_names, inotify_watch_dir

__all__ = ["GuardedPath", "PathGuard", "describe", "existing_of_ours", "rename_noreplace"]

# How many ``<path>.displaced-<n>`` names are tried (each one syscall) before a
# thing in the path's place is removed instead: names left by earlier servers,
# or planted, are skipped, never replaced.
_DISPLACED_NAMES = 64


def describe(st: os.stat_result, ours: str = "") -> str:
    """What a file is, for a log line: 'a symlink of uid 65534'.

    ``ours``: the kind the listener makes ("FIFO", "socket"): a file of that
    kind found in its place is "another FIFO".
    """
    mode = st.st_mode
    if stat.S_ISREG(mode):
        kind = "a regular file"
    elif stat.S_ISLNK(mode):
        kind = "a symlink"
    elif stat.S_ISDIR(mode):
        kind = "a directory"
    elif stat.S_ISFIFO(mode):
        kind = "another FIFO" if ours == "FIFO" else "a FIFO"
    elif stat.S_ISSOCK(mode):
        kind = "another socket" if ours == "socket" else "a socket"
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


def rename_noreplace(src: str, dst: str) -> None:
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


class PathGuard:
    """Keeps ``path`` the listener's own while it serves (see the module docstring).

    ``kind`` names what the listener makes there ("FIFO", "socket"), in log
    lines.  ``recreate()`` makes it again (and sets ``inode``); it raises
    ``OSError`` if it cannot.  ``lost``: said when something that took the
    path's place is moved aside (what clients wrote into it is lost, say).
    The owner sets ``inode`` to ``(st_dev, st_ino)`` of what it made.
    """

    #: seconds between two warnings that the path was taken; the ones between are
    #: counted and said in one line at the period's end
    warn_period = 60.0

    def __init__(
        self,
        path: Path,
        kind: str,
        recreate: Callable[[], None],
        *,
        lost: str = "",
    ) -> None:
        self.path = path
        self.kind = kind
        self._recreate = recreate
        self._lost = lost
        #: ``(st_dev, st_ino)`` of the listener's own file at the path
        self.inode: tuple[int, int] | None = None
        #: times the path was found removed or replaced by something else while serving
        self.replaced = 0
        #: things found in the path's place and moved aside (renamed) or, failing that, removed
        self.displaced = 0
        self._displaced_seq = 0  # the last n of a ``<path>.displaced-<n>`` name tried
        self._watch_fd = -1
        self._loop: asyncio.AbstractEventLoop | None = None
        # The rate limit of the warnings (on the loop's clock: a mock server clock
        # need not move for a warning to be said).
        self._warned_at = -math.inf
        self._unsaid = 0
        self._last_unsaid = ""
        self._unsaid_handle: asyncio.TimerHandle | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Watch the path's directory on ``loop`` (a warning if inotify is unavailable)."""
        self._loop = loop
        self._watch_fd = inotify_watch_dir(self.path.parent)
        if self._watch_fd >= 0:
            loop.add_reader(self._watch_fd, self._directory_changed)
        else:
            logger.warning(
                "cannot watch %s: a %s removed under us goes unnoticed", self.path, self.kind
            )

    def _directory_changed(self) -> None:
        try:
            data = os.read(self._watch_fd, 64 * 1024)
        except (BlockingIOError, InterruptedError):
            return
        names = inotify_names(data)
        # b"": the event queue overflowed (an event about our name may be lost).
        if os.fsencode(self.path.name) in names or b"" in names:
            self.check()

    def is_ours(self) -> bool:
        """Whether the path is still the listener's own file (one ``lstat``)."""
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return False
        return (st.st_dev, st.st_ino) == self.inode

    def check(self) -> None:
        """Make the path the listener's again if it was removed or replaced: a few syscalls."""
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            found = None
        else:
            if (st.st_dev, st.st_ino) == self.inode:
                return  # an event about our own rename or creation, or a name reused
            found = st
        self.replaced += 1
        if found is None:
            what = f"{self.path} was removed while serving"
            lost = ""
        else:
            what = f"{self.path} was replaced by {describe(found, self.kind)} while serving"
            try:
                aside = self._move_aside(found)
            except OSError as exc:
                self.warn(
                    f"{what}, and it cannot be moved aside or removed ({exc.strerror}): "
                    f"clients cannot reach this server until it is"
                )
                return
            what += f"; moved it aside to {aside}" if aside else "; removed it"
            lost = self._lost
        try:
            self._recreate()
        except OSError as exc:
            # Taken again in between: that is another event, handled in turn.
            self.warn(f"{what}; could not create the {self.kind} again: {exc}")
            return
        self.warn(f"{what}; created the {self.kind} again{lost}")

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
                    rename_noreplace(path, aside)
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

    def warn(self, message: str) -> None:
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

    def remove(self) -> None:
        """Remove the listener's file at the path, if it is still its own."""
        if self.inode is not None:
            if self.is_ours():
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.path)
            self.inode = None

    def close(self) -> None:
        """Stop watching; say what is still summed up."""
        if self._watch_fd >= 0:
            if self._loop is not None:
                self._loop.remove_reader(self._watch_fd)
            os.close(self._watch_fd)
            self._watch_fd = -1
        if self._unsaid_handle is not None:
            self._unsaid_handle.cancel()
            self._say_unsaid()


def existing_of_ours(
    path: str | os.PathLike[str], name: str, is_kind: Callable[[int], bool], kind: str
) -> bool:
    """Whether ``path`` holds a ``kind`` of this user (``is_kind(st_mode)``); ``False`` if
    nothing is there.  ``FileExistsError`` naming the parameter ``name`` if something
    else is: it is never replaced (nor followed, if a symlink), nor another user's."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    shown = os.fspath(path)
    if not is_kind(st.st_mode):
        raise FileExistsError(
            f"`{name}` {shown!r} exists and is not {kind}; refusing to replace it"
        )
    if st.st_uid != os.geteuid():
        raise FileExistsError(
            f"`{name}` {shown!r} is {kind} of another user (uid {st.st_uid}); "
            "refusing to replace it"
        )
    return True


class GuardedPath:
    """What a listener whose path a ``PathGuard`` keeps reports of it (``_guard``)."""

    _guard: PathGuard

    @property
    def replaced(self) -> int:
        """Times the path was found removed or replaced by something else while serving."""
        return self._guard.replaced

    @property
    def displaced(self) -> int:
        """Things found in the path's place and moved aside or, failing that, removed."""
        return self._guard.displaced
