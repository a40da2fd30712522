"""aiotimer's own frames for any process of the job: a Unix stream socket the kernel authenticates.

A process that a ``TimerServer`` did not spawn itself (a torchrun rank under
``aiotimer serve``, a DataLoader worker, a helper started through a daemon)
cannot inherit a worker's pipe.  It connects here instead (``AIOTIMER_SOCKET``)
and speaks the pipes' binary frames: checksummed, stamped deadlines, a greeting
and the stack-dump signal.

Who may use it is decided by the kernel, not by anything a client writes:

- on accept, ``SO_PEERCRED`` names the peer's pid and uid (and, from Linux 6.5,
  ``SO_PEERPIDFD`` holds that very process, so a pid reused before the server
  looked is never mistaken for it).  The peer must have the server's uid and
  descend from the server or a ``roots`` pid (the FIFO's rule,
  ``foreign_descendant_of``), and it is admitted, with the fair shares of its
  worker tree, before it may send anything;
- a connection arms timers for its peer only: a frame naming another pid is
  rejected (a forked child connects anew; it never shares its parent's stream);
- the server answers each connection once, at once: WELCOME (with the pid it
  knows the peer by, and where to dump stacks) or REFUSED with the reason, so
  a refused client raises ``NotEntitledError`` instead of running unprotected.
  A refusal is counted each time and logged once per process;
- the socket is 0600, in a directory the listener makes 0700 when it does not
  exist; a path that exists and is not a stale socket of this user is refused,
  never followed through a symlink; a socket removed or replaced while serving
  is made again (``_paths.PathGuard``, as the FIFO's).

The connection says who the client is; its requests go through a pipe.  Once
welcomed, a client makes a pipe and hands its read end over on the connection
(``SCM_RIGHTS``, with its greeting), then writes its frames into the pipe, as a
spawned worker does.  Why: the server's Python cost per request is the same
either way, but a Unix stream socket makes the kernel allocate a buffer per
``send`` (each 60-byte frame), wake the reader each time and free each buffer
on read, where a pipe packs the writes into pages.  Measured on 2 cores
(``benchmarks/throughput.py``), frames on the socket itself ran at 0.75x the
pipes' throughput with 1 client and 0.65x with 16 (issue 20 asks for 0.8x).
The server takes exactly one fd, once, per connection: an anonymous pipe's
read end (recognised from its ``/proc`` link, so nothing is ``stat``-ed on a
file system the client might control, and then ``fstat``-ed), and reads it
through a description of its own, reopened non-blocking through
``/proc/self/fd`` (the client may keep a copy of the fd it sent and clear
``O_NONBLOCK`` on that: a read on the loop would then block).  Anything else
(two fds, a second handover, a file, a socket, a write end) is a counted
rejection, and the connection is closed.  The pipe is read as a worker's
(4 KiB at a time, the same decoder), every request attributed to the
connection's peer.  The connection stays watched: its end means the client
went away, and what its pipe held by then is still read (bounded: no more than
it held), then the pipe is closed too; when the peer exits, both are closed at
once (what is left speaks for no one).  The end
of the pipe alone (the client closed it) closes the pipe: the timers armed
through it stay armed until the process exits, as a worker's.  A client that
hands over no pipe (an older one) still sends its frames on the connection;
after a handover, bytes on the connection are rejected (one stream of requests
per connection, one read's share of the loop).

Costs are bounded: everything is non-blocking; a read is at most 4 KiB, decoded
in one callback (as the pipes'); a few connections are accepted per callback;
connections are capped overall (``max_connections``) and per process
(``max_connections_per_process``), and one over a cap is refused with the
reason; a peer that connects and never reads or writes holds one fd, one that
hands over its pipe two (and its pidfd, as every admitted process).  Bad
input is counted exactly and logged at a bounded rate shared by all of the
listener's connections.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import errno
import fcntl
import os
import resource
import secrets
import socket
import stat
import struct
import sys
import termios
from collections.abc import Iterable
from pathlib import Path

from .._channel import Channel, Host
from .._events import logger
from .._processes import foreign_descendant_of
from .._protocol import FrameDecoder, Reply, Request, encode_reply
from .._validate import check_count
from ._paths import GuardedPath, PathGuard, existing_of_ours, rename_noreplace

__all__ = ["SocketChannel", "SocketListener", "check_socket_path", "listen_socket"]

# As the pipes': a read's worth of frames (about 200 requests) is decoded in one
# callback, and the dispatcher lets a passed deadline go first after each.
_READ_SIZE = 4 * 1024
# Connections accepted per callback: admitting one walks the peer's ancestry in
# /proc (a few dozen syscalls, ~0.1 ms), so a flood of connects holds the loop
# for well under a millisecond at a time.
_ACCEPT_BATCH = 4
# Connections waiting in the kernel to be accepted (kernel memory, not our fds).
_BACKLOG = 1024
# SO_PEERPIDFD (Linux 6.5): a pidfd of the process that connected.
_SO_PEERPIDFD = 77
_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid
# Longest path a Unix socket address holds (sun_path, with its NUL).
_SUN_PATH_MAX = 107
# How long accepting pauses when the fd table is full (accept would fail at once,
# and the listening socket stay readable: a busy loop).
_FD_FULL_PAUSE = 0.1
# Refused pids remembered, to log each refusal once per process (oldest forgotten first).
_REFUSALS_REMEMBERED = 4096
_SEND_FLAGS = socket.MSG_NOSIGNAL | socket.MSG_DONTWAIT
_FD_SIZE = 4  # an fd in an SCM_RIGHTS message: a C int
# Room for two fds in a read's ancillary data: a client hands over one, so two are
# seen as two, and more are cut (the kernel closes what does not fit: MSG_CTRUNC).
_FDS_SPACE = socket.CMSG_SPACE(2 * _FD_SIZE)


def _check_length(path: Path, name: str) -> None:
    size = len(os.fsencode(path))
    if size > _SUN_PATH_MAX:
        raise ValueError(
            f"`{name}` {os.fspath(path)!r} is {size} bytes, longer than a Unix socket "
            f"path may be ({_SUN_PATH_MAX}); choose a shorter one"
        )


def check_socket_path(path: str | os.PathLike[str], name: str = "path") -> bool:
    """Whether a stale socket of this user is at ``path`` (to be replaced).

    ``FileExistsError`` if anything else is there: a file, a symlink (never
    followed), a directory, another user's socket, or a socket a server still
    listens on (another job's: two servers on one path would steal each
    other's clients).
    """
    if not existing_of_ours(path, name, stat.S_ISSOCK, "a socket"):
        return False
    shown = os.fspath(path)
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
    try:
        probe.connect(os.fspath(path))
    except (ConnectionRefusedError, FileNotFoundError):
        return True  # nothing listens: left behind by a server that exited
    except BlockingIOError:  # its backlog is full: very much alive
        pass
    except OSError:
        return True
    finally:
        probe.close()
    raise FileExistsError(
        f"`{name}` {shown!r} is a socket a server is listening on; refusing to replace it"
    )


def _private_directory(directory: Path, name: str) -> bool:
    """Make ``directory`` with mode 0700 if it does not exist; whether it was made.

    An existing one is used if it is a directory (not a symlink) of this user
    or root, and no other user may replace names in it (not writable by others,
    or sticky, as /tmp is).
    """
    try:
        os.mkdir(directory, 0o700)
    except FileExistsError:
        made = False
    else:
        made = True
    # Checked through an fd opened without following a symlink: what is checked
    # is what is used.
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise FileExistsError(
            f"`{name}`'s directory {os.fspath(directory)!r} is not a directory "
            f"({exc.strerror}); refusing to use it"
        ) from None
    try:
        st = os.fstat(fd)
        if made:
            os.fchmod(fd, 0o700)  # mkdir applied the umask
            return True
        if st.st_uid not in (os.geteuid(), 0):
            raise FileExistsError(
                f"`{name}`'s directory {os.fspath(directory)!r} belongs to another user "
                f"(uid {st.st_uid}); refusing to use it"
            )
        if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
            raise FileExistsError(
                f"`{name}`'s directory {os.fspath(directory)!r} is writable by others "
                f"(mode {stat.S_IMODE(st.st_mode):o}) and not sticky: they could replace "
                "the socket; use a private directory"
            )
        return False
    finally:
        os.close(fd)


class SocketListener(GuardedPath, Channel):
    """Accepts connections on the socket at ``path``; each one is a ``SocketChannel``.

    Create it with ``await listen_socket(server, path)``; it closes with the
    server.  As a channel it sends no requests: it is what refusals of
    connections are counted and logged on.
    """

    def __init__(
        self,
        host: Host,
        path: str | os.PathLike[str],
        *,
        roots: Iterable[int] = (),
        mode: int = 0o600,
        max_connections: int | None = None,
        max_connections_per_process: int = 4,
    ) -> None:
        super().__init__(host.sink)
        self.path = Path(os.path.abspath(path))
        self.name = f"socket {self.path}"
        self.roots = frozenset((os.getpid(), *roots))
        self._host = host
        self._mode = mode
        if max_connections is None:
            # A quarter of the fd table: the registry's pidfds may take half.
            max_connections = max(64, resource.getrlimit(resource.RLIMIT_NOFILE)[0] // 4)
        #: most connections open at once; one more is refused with the reason
        self.max_connections = max_connections
        #: most connections one process may hold at once (it needs one; a few more
        #: cover a reconnect while the server has not yet seen the old one close)
        self.max_connections_per_process = max_connections_per_process
        self._sock: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._made_directory = False
        self._paused: asyncio.TimerHandle | None = None
        self._connections: dict[int, SocketChannel] = {}  # channel id -> open connection
        self._per_pid: dict[int, int] = {}
        self._refused_pids: dict[int, None] = {}  # insertion-ordered: the oldest goes first
        self._guard = PathGuard(self.path, "socket", self._recreate)
        #: connections accepted (and admitted)
        self.accepted = 0
        #: connections refused (another uid, not a descendant, over a cap)
        self.refused = 0
        #: connections whose client handed over a pipe for its requests
        self.piped = 0

    def __repr__(self) -> str:
        return f"<SocketListener {self.path} connections={len(self._connections)}>"

    # -- Channel: what admission asks of the listener itself (never: it sends nothing)

    def entitled(self, pid: int) -> str | None:
        """The listener itself arms nothing: its connections do."""
        return f"pid {pid}: requests come on a connection, not on the listener"

    @property
    def connections(self) -> int:
        """Connections open now."""
        return len(self._connections)

    # -- the listening socket

    def open(self, loop: asyncio.AbstractEventLoop) -> None:
        """Make the directory (if needed) and the socket, and start accepting."""
        _check_length(self.path, "path")
        self._loop = loop
        self._made_directory = _private_directory(self.path.parent, "path")
        try:
            if check_socket_path(self.path):
                os.unlink(self.path)  # left behind by an earlier server of ours
            self._create()
        except BaseException:
            self._remove_directory()
            raise
        self._guard.start(loop)
        logger.info("listening for aiotimer clients on %s", self.path)

    def _create(self) -> None:
        """Bind a new socket at the path with its mode set before anyone can connect.

        It is bound at a temporary name, given its mode, and renamed into place
        (never over anything: ``FileExistsError`` if the path was taken
        meanwhile), so no client ever finds it with the umask's mode.
        """
        assert self._loop is not None
        sock = socket.socket(
            socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC
        )
        temp = self.path.parent / f".{secrets.token_hex(3)}"
        try:
            _check_length(temp, "path")
            sock.bind(os.fspath(temp))
            try:
                # In a directory only we (or, sticky, only the owner of a name) may
                # change, the name is still ours: chmod follows nothing else.
                os.chmod(temp, self._mode)
                st = os.lstat(temp)
                if not stat.S_ISSOCK(st.st_mode) or st.st_uid != os.geteuid():
                    raise FileExistsError(f"{os.fspath(temp)!r} was replaced while it was made")
                sock.listen(_BACKLOG)
                rename_noreplace(os.fspath(temp), os.fspath(self.path))
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(temp)
                raise
        except BaseException:
            sock.close()
            raise
        old = self._sock
        self._sock = sock
        self._guard.inode = (st.st_dev, st.st_ino)
        self._loop.add_reader(sock.fileno(), self._accept)
        if old is not None:
            # Connections waiting on the old socket are reset: their clients connect again.
            self._loop.remove_reader(old.fileno())
            old.close()

    def _recreate(self) -> None:
        self._create()

    def _accept(self) -> None:
        sock = self._sock
        if sock is None:
            return
        for _ in range(_ACCEPT_BATCH):
            try:
                conn, _ = sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue
            except OSError as exc:
                self._pause_accepting(exc)
                return
            try:
                self._welcome(conn)
            except Exception:  # a bug of ours must cost this connection, never the listener
                logger.exception("accepting a connection on %s failed", self.path)
                conn.close()

    def _pause_accepting(self, exc: OSError) -> None:
        """The fd table (or the kernel's memory) is full: stop accepting for a moment.

        Otherwise the listening socket stays readable, and every loop turn
        would try, and fail, again.
        """
        assert self._loop is not None and self._sock is not None
        if exc.errno not in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
            logger.error("accepting on %s failed: %s", self.path, exc)
        self.sink.reject(self, f"cannot accept a connection: {exc.strerror}", "not_admitted")
        self._loop.remove_reader(self._sock.fileno())
        self._paused = self._loop.call_later(_FD_FULL_PAUSE, self._resume_accepting)

    def _resume_accepting(self) -> None:
        self._paused = None
        if self._sock is not None and self._loop is not None:
            self._loop.add_reader(self._sock.fileno(), self._accept)

    def _welcome(self, conn: socket.socket) -> None:
        """Admit or refuse a new connection, and tell its client which (one small send)."""
        pid, uid, _ = _PEERCRED.unpack(
            conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
        )
        reason: str | None = None
        if uid != os.geteuid():
            reason = (
                f"pid {pid} runs as uid {uid}, not as this server's uid {os.geteuid()}: "
                "only the server's user may arm timers"
            )
        elif pid <= 0:
            reason = "the peer is not in the server's pid namespace (the kernel named no pid)"
        elif len(self._connections) >= self.max_connections:
            reason = (
                f"the server already holds {len(self._connections)} connections, its cap "
                f"(max_connections={self.max_connections})"
            )
        elif self._per_pid.get(pid, 0) >= self.max_connections_per_process:
            reason = (
                f"pid {pid} already holds {self._per_pid[pid]} connections, the cap per "
                f"process (max_connections_per_process={self.max_connections_per_process}); "
                "a process needs one"
            )
        channel: SocketChannel | None = None
        if reason is None:
            channel = SocketChannel(self, pid)
            reason = self.sink.admit(channel, pid, _peer_pidfd(conn))
        if reason is not None or channel is None:
            self._refuse(conn, pid, reason or "refused")
            return
        self.accepted += 1
        # If the peer has closed its end already, what it sent before is still read
        # (a process that armed a timer, closed the socket and hangs is still killed).
        with contextlib.suppress(OSError):
            conn.send(
                encode_reply(Reply(True, pid, self._host.dump_signal or 0, self._dump_dir())),
                _SEND_FLAGS,
            )
        conn.setblocking(False)
        self._connections[channel.id] = channel
        self._per_pid[pid] = self._per_pid.get(pid, 0) + 1
        self._host.add_channel(channel)
        assert self._loop is not None
        channel.start(conn, self._loop)

    def _dump_dir(self) -> str:
        return self._host.dump_dir or ""

    def _refuse(self, conn: socket.socket, pid: int, reason: str) -> None:
        """Tell the client why, close, count; log the first refusal of each process."""
        self.refused += 1
        with contextlib.suppress(OSError):
            conn.send(encode_reply(Reply(False, pid, 0, reason)), _SEND_FLAGS)
        conn.close()
        first = pid not in self._refused_pids
        if first:
            if len(self._refused_pids) >= _REFUSALS_REMEMBERED:
                del self._refused_pids[next(iter(self._refused_pids))]
            self._refused_pids[pid] = None
        self.sink.reject(
            self, f"refused a connection from pid {pid}: {reason}", "not_admitted", log=first
        )

    def forget(self, channel: SocketChannel) -> None:
        """``channel`` closed."""
        if self._connections.pop(channel.id, None) is None:
            return
        left = self._per_pid.get(channel.peer_pid, 0) - 1
        if left > 0:
            self._per_pid[channel.peer_pid] = left
        else:
            self._per_pid.pop(channel.peer_pid, None)

    # -- closing

    def _remove_directory(self) -> None:
        if self._made_directory:
            self._made_directory = False
            with contextlib.suppress(OSError):  # not empty: someone put something there
                os.rmdir(self.path.parent)

    def close(self) -> None:
        """Stop accepting, close every connection, remove the socket (and the directory
        if the listener made it), if they are still its own."""
        if self._paused is not None:
            self._paused.cancel()
            self._paused = None
        if self._sock is not None:
            if self._loop is not None:
                self._loop.remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None
        for channel in list(self._connections.values()):
            channel.close()
        self._guard.close()
        self._guard.remove()
        self._remove_directory()

    async def aclose(self) -> None:
        """``close()``, for the server's listener protocol."""
        self.close()


def _peer_pidfd(conn: socket.socket) -> int | None:
    """A pidfd of the process that connected (Linux 6.5+), or ``None`` where there is none."""
    try:
        return conn.getsockopt(socket.SOL_SOCKET, _SO_PEERPIDFD)
    except OSError:
        return None


class SocketChannel(Channel):
    """One accepted connection: requests of its peer process only, read on the loop.

    The peer's requests come through the pipe it handed over (see the module
    docstring), or, from a client that hands over none, on the connection
    itself.  The connection stays watched either way: its end means the
    client went away.
    """

    def __init__(self, listener: SocketListener, peer_pid: int) -> None:
        super().__init__(listener.sink)
        self.listener = listener
        #: the process that connected, as the kernel named it
        self.peer_pid = peer_pid
        self.name = f"{listener.name} (pid {peer_pid})"
        self.roots = listener.roots
        self._sock: socket.socket | None = None
        self._pipe = -1  # our own read end of the peer's pipe (-1: none, or closed)
        self._piped = False  # a pipe was handed over (the only one this connection may)
        self._draining: int | None = None  # bytes left to read from the pipe, once hung up
        self._loop: asyncio.AbstractEventLoop | None = None
        self._decoder = FrameDecoder()
        self._pipe_decoder = FrameDecoder()
        self._peer_exited = False

    @property
    def rejection_group(self) -> tuple[int, str]:
        """The listener's: many connections cost no more log lines than one."""
        return self.listener.id, self.listener.name

    @property
    def closed(self) -> bool:
        """Whether neither the connection nor its pipe is read any more."""
        return self._sock is None and self._pipe < 0

    @property
    def piped(self) -> bool:
        """Whether the peer handed over a pipe for its requests."""
        return self._piped

    def entitled(self, pid: int) -> str | None:
        """The peer itself, while it lives, if it is this user's and descends from a root."""
        if pid != self.peer_pid:
            return (
                f"pid {pid} is not this connection's peer (pid {self.peer_pid}, as the "
                "kernel says): a connection arms timers for its own process only"
            )
        if self._peer_exited:
            return f"pid {pid}, this connection's peer, has exited"
        return foreign_descendant_of(pid, self.roots)

    def start(self, sock: socket.socket, loop: asyncio.AbstractEventLoop) -> None:
        """Start reading the connection ``sock`` (non-blocking) on ``loop``."""
        self._sock = sock
        self._loop = loop
        loop.add_reader(sock.fileno(), self._readable)

    # -- the connection: a pipe handed over once, legacy frames, its end

    def _readable(self) -> None:
        sock = self._sock
        if sock is None:
            return
        try:
            data, ancillary, flags, _ = sock.recvmsg(
                _READ_SIZE, _FDS_SPACE, socket.MSG_CMSG_CLOEXEC
            )
        except (BlockingIOError, InterruptedError):
            return
        except OSError:  # ECONNRESET: the peer went away with unread data
            data, ancillary, flags = b"", [], 0
        if ancillary or flags & socket.MSG_CTRUNC:
            # Taken (or closed) before anything else: a received fd is ours to close.
            if not self._take_pipe(_received_fds(ancillary), bool(flags & socket.MSG_CTRUNC)):
                return
            handed_over = True
        else:
            handed_over = False
        if not data or self._peer_exited:
            # After its peer's exit the connection speaks for no one: what is left
            # (a release of a timer dropped with the process) is moot, not an error.
            self._hang_up()
            return
        if self._piped and not handed_over:
            # Requests come through the pipe now; a second stream is refused (it
            # would double the connection's share of the loop).
            self.sink.reject(
                self,
                f"{len(data)} bytes on the connection of pid {self.peer_pid} after it "
                "handed over its pipe: requests come through the pipe",
            )
            return
        self._deliver(self._decoder, data)

    def _deliver(self, decoder: FrameDecoder, data: bytes) -> None:
        requests, errors = decoder.feed(data)
        peer = self.peer_pid
        for request in requests:
            if request[1] != peer:
                requests = self._refuse_others(requests)
                break
        self.sink.dispatch(self, requests, errors)

    def _refuse_others(self, requests: list[Request]) -> list[Request]:
        """Reject the requests naming a pid other than the peer's; the rest."""
        peer = self.peer_pid
        for request in requests:
            if request.pid != peer:
                self.sink.reject(
                    self,
                    f"a request naming pid {request.pid} on the connection of pid {peer}: "
                    "a connection arms timers for its own process only",
                    "not_admitted",
                )
        return [request for request in requests if request.pid == peer]

    def _take_pipe(self, fds: list[int], truncated: bool) -> bool:
        """Read requests from the one pipe the peer handed over; whether it was one.

        Anything else (a second handover, two fds, a file, a socket, a write
        end) is a rejection, and the connection is closed.  The fds received
        are closed here either way: the pipe is read through a description of
        our own.
        """
        reason: str | None = None
        pipe = -1
        try:
            if self._piped:
                reason = "handed over a second pipe (a connection hands over one, once)"
            elif truncated or len(fds) != 1:
                reason = f"handed over {'more than 2' if truncated else len(fds)} fds, not one pipe"
            else:
                reason, pipe = _open_pipe(fds[0])
        finally:
            for fd in fds:
                os.close(fd)
        if reason is not None:
            self.sink.reject(
                self, f"pid {self.peer_pid} {reason}; closed its connection", "malformed"
            )
            self._finish()
            return False
        assert self._loop is not None
        self._pipe = pipe
        self._piped = True
        self.listener.piped += 1
        self._loop.add_reader(pipe, self._pipe_readable)
        return True

    # -- the pipe

    def _pipe_readable(self) -> None:
        if self._pipe < 0:
            return
        draining = self._draining
        try:
            data = os.read(
                self._pipe, _READ_SIZE if draining is None else min(_READ_SIZE, draining)
            )
        except (BlockingIOError, InterruptedError):
            if draining is not None:  # empty (another reader of it took the rest)
                self._finish()
            return
        except OSError as exc:
            logger.error("reading the pipe of %s failed: %s; closing it", self.name, exc)
            data = b""
        if self._peer_exited:
            self._finish()  # moot, as on the connection
            return
        if not data:
            # Every writer closed it: the timers armed through it stay armed until
            # their process exits (it may close its pipe and hang).
            self._close_pipe()
            if draining is not None:
                self._finish()
            return
        self._deliver(self._pipe_decoder, data)
        if draining is not None and self._pipe >= 0:
            self._draining = draining - len(data)
            if self._draining <= 0:
                self._finish()

    def _close_pipe(self) -> None:
        if self._pipe < 0:
            return
        if self._pipe_decoder.pending and not self._peer_exited:
            self.sink.reject(
                self,
                f"the pipe of pid {self.peer_pid} closed with {self._pipe_decoder.pending} "
                "bytes of an incomplete frame; dropped",
            )
        assert self._loop is not None
        self._loop.remove_reader(self._pipe)
        os.close(self._pipe)
        self._pipe = -1

    # -- the end

    def process_exited(self, pid: int) -> None:
        """The peer exited: nothing on this connection may arm a timer any more."""
        if pid == self.peer_pid:
            self._peer_exited = True
            if self._loop is not None and not self.closed:
                # Not from inside the registry's exit bookkeeping: on the next turn.
                self._loop.call_soon(self._finish)

    def _hang_up(self) -> None:
        """The connection ended: the client went away (or closed it).

        What its pipe held by then is still read (a process that armed a timer,
        closed its connection and hangs is still killed), and no more: a writer
        that goes on writing cannot keep the pipe open.
        """
        sock = self._sock
        if sock is None:
            return
        if self._decoder.pending and not self._peer_exited:
            self.sink.reject(
                self,
                f"the connection closed with {self._decoder.pending} bytes of an "
                "incomplete frame; dropped",
            )
        if self._pipe >= 0 and not self._peer_exited:
            left = _unread(self._pipe)
            if left > 0:
                assert self._loop is not None
                self._loop.remove_reader(sock.fileno())
                self._draining = left
                return
        self._finish()

    def _finish(self) -> None:
        """Close the connection and its pipe, and tell the server (once)."""
        if self.closed:
            return
        self.close()
        self.sink.channel_closed(self)

    def close(self) -> None:
        """Stop reading, and close the connection and its pipe."""
        if self.closed:
            return
        assert self._loop is not None
        self._close_pipe()
        sock, self._sock = self._sock, None
        if sock is not None:
            if self._draining is None:  # else no longer watched
                self._loop.remove_reader(sock.fileno())
            sock.close()
        self.listener.forget(self)


def _received_fds(ancillary: list[tuple[int, int, bytes]]) -> list[int]:
    """The fds an ``SCM_RIGHTS`` message installed in this process (all to be closed)."""
    fds: list[int] = []
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(data) - len(data) % _FD_SIZE
            fds.extend(array.array("i", data[:usable]))
    return fds


def _open_pipe(fd: int) -> tuple[str | None, int]:
    """``(None, a non-blocking read end of our own)`` if ``fd`` is a pipe's read end, else
    ``(why not, -1)``.

    Nothing here waits on a file system the peer might control (a FUSE mount
    could make a ``stat`` hang): the kind is read from ``/proc``'s link first,
    and only an anonymous pipe is ``fstat``-ed.  The pipe is reopened through
    ``/proc/self/fd``: a description of our own, whose ``O_NONBLOCK`` the peer,
    who may keep a copy of the fd it sent, cannot clear (a read on the loop
    would then block).
    """
    link = f"/proc/self/fd/{fd}"
    try:
        target = os.readlink(link)
    except OSError as exc:
        return f"handed over an fd that cannot be examined ({exc.strerror})", -1
    if not target.startswith("pipe:["):
        kind = target.split(":", 1)[0] if target.startswith(("socket:", "anon_inode:")) else "file"
        return f"handed over an fd that is not a pipe (a {kind})", -1
    if not stat.S_ISFIFO(os.fstat(fd).st_mode):
        return "handed over an fd that is not a pipe", -1
    if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE != os.O_RDONLY:
        return "handed over the write end of a pipe, not its read end", -1
    try:
        own = os.open(link, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        return f"handed over a pipe that cannot be opened ({exc.strerror})", -1
    return None, own


def _unread(fd: int) -> int:
    """Bytes waiting in the pipe ``fd``."""
    try:
        return int.from_bytes(fcntl.ioctl(fd, termios.FIONREAD, bytes(4)), sys.byteorder)
    except OSError:
        return 0


async def listen_socket(
    server: Host,
    path: str | os.PathLike[str],
    *,
    roots: Iterable[int] = (),
    mode: int = 0o600,
    max_connections: int | None = None,
    max_connections_per_process: int = 4,
) -> SocketListener:
    """Serve aiotimer clients (``AIOTIMER_SOCKET``) on a new Unix socket at ``path``.

    ``path``'s directory is made with mode 0700 if it does not exist (and
    removed on close); an existing one must be a directory, not a symlink, in
    which no other user may replace names.  ``roots``: pids (a torchrun agent,
    say) whose descendants may connect, besides the server's own descendants.
    ``max_connections`` (default: a quarter of the fd limit, at least 64) and
    ``max_connections_per_process``: over either, a connection is refused with
    the reason.  Raises ``FileExistsError`` if something that is not a stale
    socket of this user is at ``path``, ``ValueError`` if ``path`` is too long
    for a socket address.
    """
    loop = server.running_loop()
    max_connections = check_count("max_connections", max_connections, optional=True)
    per_process = check_count("max_connections_per_process", max_connections_per_process)
    assert per_process is not None
    listener = SocketListener(
        server,
        path,
        roots=roots,
        mode=mode,
        max_connections=max_connections,
        max_connections_per_process=per_process,
    )
    listener.open(loop)
    server.add_listener(listener)
    return listener
