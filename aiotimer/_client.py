"""Worker side: ``expires()`` and ``timer()``, and the clients that carry their requests."""

from __future__ import annotations

import abc
import faulthandler
import os
import stat
import struct
import sys
import threading
import time
import warnings
import weakref
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

from ._exceptions import (
    ClientNotConfiguredError,
    NotEntitledError,
    ProtocolError,
    ServerUnavailableError,
)
from ._protocol import (
    ENV_DISABLE,
    ENV_DUMP_DIR,
    ENV_DUMP_SIGNAL,
    ENV_FD,
    ENV_FD_INODE,
    ENV_SOCKET,
    Reply,
    decode_reply,
    dump_file_name,
    encode_acquire_stamped,
    encode_hello,
    encode_release,
)
from ._validate import check_seconds

if TYPE_CHECKING:
    import socket

__all__ = [
    "PipeClient",
    "SocketClient",
    "TimerClient",
    "TimerScope",
    "call_site",
    "configure",
    "expires",
    "get_client",
    "timer",
]

_pid = os.getpid()


class TimerClient(abc.ABC):
    """Sends a process's timer requests to a server.

    ``acquire`` arms (or re-arms: the same scope replaces) a timer that expires
    at ``deadline``, in ``time.monotonic()`` seconds; ``release`` disarms it.
    """

    @abc.abstractmethod
    def acquire(self, scope: str, deadline: float) -> None:
        """Arm ``scope`` to expire at ``deadline`` (``time.monotonic()`` seconds)."""

    @abc.abstractmethod
    def release(self, scope: str) -> None:
        """Disarm ``scope``; releasing an unknown scope is harmless."""

    def acquire_after(self, scope: str, seconds: float) -> None:
        """Arm ``scope`` to expire ``seconds`` from now (what ``expires`` calls)."""
        self.acquire(scope, time.monotonic() + seconds)


def _register_dump(signal: int, dump_dir: str | os.PathLike[str] | None, pid: int) -> Any:
    """Have ``faulthandler`` write this process's stacks on ``signal`` (0: nothing).

    Into ``dump_dir``'s file for ``pid`` (the name the server looks for), or
    else to stderr.  Returns the file, to be kept open: faulthandler writes to
    its fd from a signal handler.
    """
    if not signal:
        return None
    if dump_dir:
        try:
            dump_file = open(os.path.join(dump_dir, dump_file_name(pid)), "w")  # noqa: SIM115
        except OSError:
            pass
        else:
            faulthandler.register(signal, file=dump_file, all_threads=True, chain=False)
            return dump_file
    faulthandler.register(signal, all_threads=True, chain=False)
    return None


_pipe_clients: weakref.WeakSet[PipeClient] = weakref.WeakSet()


class PipeClient(TimerClient):
    """Writes requests to the pipe a ``TimerServer`` gave its spawned worker.

    One ``write`` per request, each at most ``PIPE_BUF`` bytes, so requests from
    a worker and from its forked children never interleave.  When the server
    has gone, writes fail and raise ``ServerUnavailableError`` (a
    ``BrokenPipeError``).  With ``dump_signal``, the client registers
    ``faulthandler`` to write every thread's stack on that signal (into a file
    of ``dump_dir`` named for its pid, or else to stderr) and tells the server,
    which may send it before a kill.  A forked child registers its own file.
    """

    def __init__(
        self,
        fd: int,
        *,
        dump_signal: int | None = None,
        dump_dir: str | os.PathLike[str] | None = None,
        inode: int | None = None,
    ) -> None:
        try:
            st = os.fstat(fd)
        except OSError as exc:
            raise ServerUnavailableError(f"timer pipe fd {fd} is not open: {exc}") from None
        if not stat.S_ISFIFO(st.st_mode):
            raise ServerUnavailableError(f"timer pipe fd {fd} is not a pipe")
        if inode is not None and st.st_ino != inode:
            # The environment was inherited, the fd was not: this number is now some
            # other pipe (a DataLoader queue, say), which frames must never go into.
            raise ServerUnavailableError(
                f"fd {fd} is not the timer pipe: it is another pipe (inode {st.st_ino}, "
                f"not {inode})"
            )
        self._fd = fd
        self._dump_signal = dump_signal or 0
        self._dump_dir = dump_dir
        self._dump_file: Any = None
        self._greeted_pid = 0
        _pipe_clients.add(self)

    def __repr__(self) -> str:
        return f"<PipeClient fd={self._fd} dump_signal={self._dump_signal}>"

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> PipeClient:
        """The client of the server that spawned this process (``AIOTIMER_FD``)."""
        env = os.environ if environ is None else environ
        raw = env.get(ENV_FD)
        if raw is None:
            raise ClientNotConfiguredError(
                f"no timer client: call aiotimer.configure(client), or run under a "
                f"TimerServer (the environment has no {ENV_FD}); {_OPT_OUT}"
            )
        try:
            fd = int(raw)
            dump = int(env.get(ENV_DUMP_SIGNAL, "0") or 0)
            inode = int(env[ENV_FD_INODE]) if env.get(ENV_FD_INODE) else None
        except ValueError:
            raise ClientNotConfiguredError(
                f"{ENV_FD}={raw!r} / {ENV_DUMP_SIGNAL}={env.get(ENV_DUMP_SIGNAL)!r} / "
                f"{ENV_FD_INODE}={env.get(ENV_FD_INODE)!r} must be integers"
            ) from None
        return cls(
            fd, dump_signal=dump or None, dump_dir=env.get(ENV_DUMP_DIR) or None, inode=inode
        )

    def _send(self, frame: bytes) -> None:
        if self._greeted_pid != _pid:  # a new process (this one, or a forked child)
            self._greeted_pid = _pid
            self._dump_file = _register_dump(self._dump_signal, self._dump_dir, _pid)
            self._write(encode_hello(_pid, self._dump_signal))
        self._write(frame)

    def _write(self, frame: bytes) -> None:
        try:
            os.write(self._fd, frame)
        except OSError as exc:
            raise ServerUnavailableError(
                f"the timer server is not reading (write to fd {self._fd} failed: {exc})"
            ) from None

    def acquire(self, scope: str, deadline: float) -> None:
        """Arm ``scope`` until ``deadline`` (``time.monotonic()`` seconds)."""
        self._send(encode_acquire_stamped(_pid, scope, deadline, time.monotonic()))

    def acquire_after(self, scope: str, seconds: float) -> None:
        """Arm ``scope`` to expire ``seconds`` from now.

        The request carries this process's clock reading: the server learns the
        offset between the two clocks, so a worker in another time namespace is
        timed right too (never early).
        """
        now = time.monotonic()
        self._send(encode_acquire_stamped(_pid, scope, now + seconds, now))

    def release(self, scope: str) -> None:
        """Disarm ``scope``."""
        self._send(encode_release(_pid, scope))


# How long a refusal is repeated without asking the server again: a caller that
# catches NotEntitledError in a loop must not make the server refuse it in a loop.
_REFUSAL_HOLD = 1.0

_socket_clients: weakref.WeakSet[SocketClient] = weakref.WeakSet()


class _Connection(NamedTuple):
    """This process's connection to the server, and the pipe its requests go through."""

    sock: socket.socket
    #: the write end of the pipe whose read end the server holds
    pipe: int
    #: ``os.getpid()`` when it was made
    owner: int
    #: the pid the server knows this process by
    wire_pid: int


class SocketClient(TimerClient):
    """Sends requests to the timer server of the Unix socket ``AIOTIMER_SOCKET``.

    For any process of the job, spawned by the server or not (a torchrun rank
    under ``aiotimer serve``, a DataLoader worker).  One connection per
    process, made on first use: the server answers it at once, and a process
    it refuses (another user, not a descendant of the server, over a cap)
    gets ``NotEntitledError`` with the server's reason, on entering the block.
    The connection is for who we are; the requests go through a pipe whose
    read end the client hands over on it (``SCM_RIGHTS``), one ``write`` of at
    most ``PIPE_BUF`` bytes each, as a ``PipeClient``'s: a socket costs the
    kernel an allocation and a wake-up per 60-byte request, a pipe packs them
    into pages (see ``aiotimer.transports.socket``).  After ``fork`` the child
    drops its parent's connection and pipe and connects anew;
    ``multiprocessing`` workers of any start method each get their own.  If
    the server went away (a write fails with ``EPIPE``), the client connects
    once more (a restarted server); else ``ServerUnavailableError``.  The
    stack-dump signal and directory come from the server's answer.
    """

    def __init__(self, path: str | os.PathLike[str], *, connect_timeout: float = 10.0) -> None:
        self.path = os.fspath(path)
        self._timeout = check_seconds("connect_timeout", connect_timeout)
        self._conn: _Connection | None = None
        # The fd number of the pipe of a connection that broke: the next one's pipe takes
        # it over (dup2), so a thread still holding the number never writes into an fd
        # that the number was reused for meanwhile (a file of the application's).
        self._spare = -1
        self._lock = threading.Lock()
        self._refusal: tuple[int, float, str] | None = None  # pid, when, message
        self._dump_file: Any = None
        _socket_clients.add(self)

    def __repr__(self) -> str:
        state = "connected" if self._conn is not None else "not connected"
        return f"<SocketClient {self.path!r} {state}>"

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> SocketClient:
        """The client of the socket ``AIOTIMER_SOCKET`` names."""
        env = os.environ if environ is None else environ
        path = env.get(ENV_SOCKET)
        if not path:
            raise ClientNotConfiguredError(f"no timer socket: the environment has no {ENV_SOCKET}")
        return cls(path)

    # -- the connection

    def _connection(self) -> _Connection:
        """This process's connection; connects if needed."""
        conn = self._conn
        if conn is not None and conn.owner == os.getpid():
            return conn
        with self._lock:
            conn = self._conn
            pid = os.getpid()
            if conn is not None and conn.owner == pid:
                return conn
            if conn is not None:  # inherited from the parent (a fork the hook missed)
                self._drop()
            refusal = self._refusal
            if refusal is not None and refusal[0] == pid:
                if time.monotonic() - refusal[1] < _REFUSAL_HOLD:
                    raise NotEntitledError(refusal[2])
                self._refusal = None
            return self._connect(pid)

    def _connect(self, pid: int) -> _Connection:
        import socket  # only a socket client needs it; keeps a pipe worker's start lean

        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            # The kernel's timeouts, on a blocking socket: a Unix socket's connect waits
            # for room in a listener's full backlog only when blocking (a non-blocking
            # one, as Python's settimeout makes it, fails at once with EAGAIN).
            whole = int(self._timeout)
            timeout = _TIMEVAL.pack(whole, int((self._timeout - whole) * 1e6))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeout)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeout)
            reply = self._handshake(sock)
        except BaseException:
            sock.close()
            raise
        if not reply.welcome:
            sock.close()
            message = f"the timer server on {self.path} refused this process: {reply.text}"
            self._refusal = (pid, time.monotonic(), message)
            raise NotEntitledError(message)
        try:
            self._dump_file = _register_dump(reply.dump_signal, reply.text, reply.pid)
            pipe = self._hand_over(sock, encode_hello(reply.pid, reply.dump_signal))
        except OSError as exc:
            sock.close()
            raise ServerUnavailableError(
                f"the timer server on {self.path} closed the connection ({exc})"
            ) from None
        conn = _Connection(sock, pipe, pid, reply.pid)
        self._conn = conn
        return conn

    def _hand_over(self, sock: socket.socket, hello: bytes) -> int:
        """Send the server a new pipe's read end (with ``hello``); its write end."""
        import socket

        read, write = os.pipe2(os.O_CLOEXEC)
        try:
            # The greeting rides with the fd: a stream socket carries an fd only along
            # with data, and the server reads both in one call.  Under the connect
            # timeout still: a server that reads nothing cannot hold us here.
            socket.send_fds(sock, [hello], [read], _MSG_NOSIGNAL)
        except BaseException:
            os.close(write)
            raise
        finally:
            os.close(read)  # the server's now: EOF and EPIPE mean what they should
        if self._spare >= 0:
            os.dup2(write, self._spare, inheritable=False)
            os.close(write)
            write, self._spare = self._spare, -1
        return write

    def _handshake(self, sock: socket.socket) -> Reply:
        """Connect and read the server's answer; raise what a failure means."""
        where = f"the timer server's socket {self.path}"
        try:
            sock.connect(self.path)
            data = b""
            reply = None
            while reply is None:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                data += chunk
                reply = decode_reply(data)
        except PermissionError as exc:
            raise NotEntitledError(
                f"cannot connect to {where}: {exc.strerror}; only the server's user may arm "
                "timers (this process runs as another user)"
            ) from None
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise ServerUnavailableError(
                f"no timer server listens on {self.path} ({exc.strerror}): it exited, or "
                f"{ENV_SOCKET} names the socket of another job"
            ) from None
        except (TimeoutError, BlockingIOError):  # the kernel's timeouts say EAGAIN
            raise ServerUnavailableError(
                f"{where} did not answer within {self._timeout:g}s"
            ) from None
        except ProtocolError as exc:
            raise ServerUnavailableError(f"{where} is not an aiotimer server's: {exc}") from None
        except OSError as exc:
            raise ServerUnavailableError(f"cannot connect to {where}: {exc}") from None
        if reply is None:
            raise ServerUnavailableError(
                f"{where} closed the connection before answering (the server is closing, "
                "or replaced its socket)"
            )
        return reply

    def close(self) -> None:
        """Close this process's connection and pipe (the next request connects again)."""
        with self._lock:
            self._drop()
            if self._spare >= 0:
                os.close(self._spare)
                self._spare = -1

    def _drop(self, *, keep_number: bool = False) -> None:
        """Forget the connection, closing this process's fds of it (only).

        ``keep_number``: the pipe's fd stays open (broken) as the spare the next
        connection's pipe takes the number of.
        """
        conn, self._conn = self._conn, None
        if conn is None:
            return
        conn.sock.close()
        if keep_number and self._spare < 0:
            self._spare = conn.pipe
        else:
            os.close(conn.pipe)

    def _forked(self) -> None:
        """In a forked child: the parent's connection, pipe and lock are not the child's."""
        self._lock = threading.Lock()
        self._refusal = None
        self._drop()
        if self._spare >= 0:
            os.close(self._spare)
            self._spare = -1

    def _resend(self, conn: _Connection, first: OSError, frame_for: Callable[[int], bytes]) -> None:
        """A write to ``conn``'s pipe failed: the server went away (``EPIPE``).  Connect
        once more (a restarted server) and write ``frame_for(pid)`` there; else
        ``ServerUnavailableError``."""
        with self._lock:
            if self._conn is conn:
                self._drop(keep_number=True)
        try:
            conn = self._connection()
        except ServerUnavailableError as exc:
            raise ServerUnavailableError(f"{exc} (after a write failed: {first})") from None
        try:
            os.write(conn.pipe, frame_for(conn.wire_pid))
        except OSError as exc:
            with self._lock:
                if self._conn is conn:
                    self._drop(keep_number=True)
            raise ServerUnavailableError(
                f"the timer server on {self.path} is not reading (write failed: {exc})"
            ) from None

    # -- requests: one write each; the slow path only when it fails

    def acquire(self, scope: str, deadline: float) -> None:
        """Arm ``scope`` until ``deadline`` (``time.monotonic()`` seconds)."""
        conn = self._connection()
        now = time.monotonic()
        try:
            os.write(conn.pipe, encode_acquire_stamped(conn.wire_pid, scope, deadline, now))
        except OSError as exc:
            self._resend(conn, exc, lambda p: encode_acquire_stamped(p, scope, deadline, now))

    def acquire_after(self, scope: str, seconds: float) -> None:
        """Arm ``scope`` to expire ``seconds`` from now (stamped with this process's clock)."""
        conn = self._connection()
        now = time.monotonic()
        deadline = now + seconds
        try:
            os.write(conn.pipe, encode_acquire_stamped(conn.wire_pid, scope, deadline, now))
        except OSError as exc:
            self._resend(conn, exc, lambda p: encode_acquire_stamped(p, scope, deadline, now))

    def release(self, scope: str) -> None:
        """Disarm ``scope``."""
        conn = self._connection()
        try:
            os.write(conn.pipe, encode_release(conn.wire_pid, scope))
        except OSError as exc:
            self._resend(conn, exc, lambda p: encode_release(p, scope))


_TIMEVAL = struct.Struct("@ll")  # struct timeval: seconds, microseconds
_MSG_NOSIGNAL = 0x4000  # socket.MSG_NOSIGNAL on Linux: EPIPE, never SIGPIPE


class _DisabledClient(TimerClient):
    """``AIOTIMER_DISABLE=1``: no watchdog on purpose; every block is a no-op."""

    def __repr__(self) -> str:
        return f"<disabled timer client ({ENV_DISABLE}=1)>"

    def acquire(self, scope: str, deadline: float) -> None:
        """Nothing: no server watches this process."""

    def release(self, scope: str) -> None:
        """Nothing."""


_disabled_warned = False

_OPT_OUT = (
    f"to run without a watchdog on purpose, set {ENV_DISABLE}=1 (every timer block is then "
    "a no-op, with one warning)"
)


def _disabled(env: Mapping[str, str]) -> bool:
    raw = env.get(ENV_DISABLE, "")
    value = raw.strip().lower()
    if value in ("", "0", "false", "no", "off"):
        return False
    if value in ("1", "true", "yes", "on"):
        return True
    raise ClientNotConfiguredError(
        f"{ENV_DISABLE}={raw!r} must be 1 (no watchdog: every timer block is a no-op) or 0"
    )


def client_from_environ(environ: Mapping[str, str] | None = None) -> TimerClient:
    """The client this process's environment names (what ``get_client`` uses).

    ``AIOTIMER_DISABLE=1``: a no-op client (one warning per process).  Else the
    pipe ``AIOTIMER_FD`` names (a worker a ``TimerServer`` spawned); if that fd
    is not open here, the socket ``AIOTIMER_SOCKET`` names, if any; else the
    socket.  With neither, ``ClientNotConfiguredError`` saying how to opt out.
    """
    global _disabled_warned
    env = os.environ if environ is None else environ
    if _disabled(env):
        if not _disabled_warned:
            _disabled_warned = True
            warnings.warn(
                f"{ENV_DISABLE}=1: no watchdog; aiotimer.expires/timer blocks in this process "
                "are not protected (a hang is not killed)",
                RuntimeWarning,
                stacklevel=4,
            )
        return _DisabledClient()
    socket_path = env.get(ENV_SOCKET)
    if env.get(ENV_FD) is not None:
        try:
            return PipeClient.from_environ(env)
        except ServerUnavailableError as exc:
            if socket_path:
                return SocketClient(socket_path)
            raise ServerUnavailableError(
                f"{exc}.  {ENV_FD}={env[ENV_FD]} is in this process's environment, but the "
                "pipe it names was not inherited: it works only in processes a TimerServer "
                "spawned (and children that keep the fd), and a launcher in between (torchrun, "
                "srun) or a subprocess started with close_fds does not pass it on.  Run the job "
                f"under `aiotimer serve -- CMD`, whose clients connect through {ENV_SOCKET}"
            ) from None
    if socket_path:
        return SocketClient(socket_path)
    raise ClientNotConfiguredError(
        f"no timer client: this process was not started by a timer server (its environment "
        f"has no {ENV_FD} or {ENV_SOCKET}); run it under `aiotimer run` or `aiotimer serve`, "
        f"or call aiotimer.configure(client); {_OPT_OUT}"
    )


_client: TimerClient | None = None
_client_lock = threading.Lock()


def _check_client(client: object) -> None:
    # torch's clients have the same two methods, but take wall-clock deadlines
    # while ``expires`` sends monotonic ones: given one, a 60 s block would
    # expire at once.  They belong with ``aiotimer.compat.torch.expires``.
    if not isinstance(client, TimerClient):
        hint = ""
        if callable(getattr(client, "acquire", None)):
            hint = (
                " (a torch-style client takes wall-clock deadlines: use it with "
                "aiotimer.compat.torch.configure/expires, or subclass aiotimer.TimerClient)"
            )
        raise TypeError(f"`client` must be an aiotimer.TimerClient, got {client!r}{hint}")


def configure(client: TimerClient | None) -> None:
    """Set the process-wide client that ``expires``/``timer`` use (``None`` resets).

    ``client`` must be an ``aiotimer.TimerClient`` (monotonic deadlines).
    """
    global _client
    if client is not None:
        _check_client(client)
    _client = client


def get_client() -> TimerClient:
    """The configured client, or the one this process's environment names.

    A worker a ``TimerServer`` spawned uses its pipe (``AIOTIMER_FD``); any
    other process of the job the server's socket (``AIOTIMER_SOCKET``); with
    ``AIOTIMER_DISABLE=1`` every block is a no-op.  See ``client_from_environ``.
    """
    global _client
    client = _client
    if client is None:
        with _client_lock:
            if _client is None:
                _client = client_from_environ()
            client = _client
    return client


# Wire scopes active in this process: a scope used by two blocks at once (nested,
# or in two threads or tasks) gets a suffix, so releasing one never disarms the other.
_active: set[str] = set()
_active_lock = threading.Lock()


def _claim(scope: str) -> str:
    with _active_lock:
        if scope not in _active:
            _active.add(scope)
            return scope
        n = 2
        while f"{scope}[{n}]" in _active:
            n += 1
        wire = f"{scope}[{n}]"
        _active.add(wire)
        return wire


def _after_fork_in_child() -> None:
    global _pid
    _pid = os.getpid()
    _active.clear()
    for client in list(_socket_clients):
        client._forked()


os.register_at_fork(after_in_child=_after_fork_in_child)

_State = Literal["created", "armed", "released", "soft-expired"]


class TimerScope:
    """A deadline around a block, released when the block exits, however it exits.

    Made by ``expires()`` (``with``) and ``timer()`` (``async with``).  If the
    block is still running at the deadline, the server acts on this process.
    Exceptions from the block propagate.  Not re-entrant: make a new one per use.
    """

    __slots__ = ("_after", "_cancel", "_client", "_scope", "_soft", "_state", "_wire")

    def __init__(
        self,
        after: float,
        scope: str,
        client: TimerClient | None = None,
        soft_timeout: float | None = None,
    ) -> None:
        if type(after) is not float or not 0 < after < float("inf"):
            after = check_seconds("after", after)
        if client is not None:
            _check_client(client)
        self._after = after
        self._scope = scope
        self._client = client
        self._soft = soft_timeout
        self._wire: str | None = None
        self._state: _State = "created"
        self._cancel: Any = None

    def __repr__(self) -> str:
        return f"<TimerScope {self._scope!r} after={self._after} {self._state}>"

    @property
    def scope(self) -> str:
        """The scope as given (or the call site)."""
        return self._scope

    @property
    def after(self) -> float:
        """Seconds from entry to the deadline."""
        return self._after

    @property
    def state(self) -> _State:
        """``created``, ``armed``, ``released`` or ``soft-expired``."""
        return self._state

    def __enter__(self) -> TimerScope:
        if self._state != "created":
            raise RuntimeError(f"{self!r} cannot be entered twice")
        client = self._client or _client or get_client()
        wire = _claim(self._scope)
        try:
            client.acquire_after(wire, self._after)
        except BaseException:
            _active.discard(wire)
            raise
        self._client = client
        self._wire = wire
        self._state = "armed"
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        wire = self._wire
        assert wire is not None and self._client is not None
        try:
            self._client.release(wire)
        finally:
            _active.discard(wire)
            if self._state == "armed":
                self._state = "released"

    async def __aenter__(self) -> TimerScope:
        self.__enter__()
        if self._soft is not None:
            import anyio  # only the soft timeout needs it; keeps worker start-up lean

            self._cancel = anyio.fail_after(self._soft)
            self._cancel.__enter__()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            if self._cancel is not None:
                try:
                    self._cancel.__exit__(exc_type, exc, tb)
                except TimeoutError as timeout:
                    self._state = "soft-expired"
                    if not timeout.args:  # anyio's has no message: say which block, and why
                        timeout.args = (
                            f"{self._scope!r} cancelled by its soft timeout after "
                            f"{self._soft:g}s (its hard deadline was {self._after:g}s)",
                        )
                    raise
        finally:
            self.__exit__(exc_type, exc, tb)


def call_site(depth: int = 1) -> str:
    """``file#line`` ``depth`` frames above the function calling this (1: its caller).

    torch's default scope, found without walking the stack (microseconds, not
    the milliseconds of ``inspect.stack()``).
    """
    frame = sys._getframe(depth + 1)
    return f"{frame.f_code.co_filename}#{frame.f_lineno}"


def expires(
    after: float, scope: str | None = None, client: TimerClient | None = None
) -> TimerScope:
    """``with expires(after=30):`` arms a timer for the block; the server acts if it overruns.

    ``scope`` defaults to the caller's ``file#line`` (cheap: no stack walk).
    Without ``client``, the configured one is used, or, in a worker that a
    ``TimerServer`` spawned, the one found in the environment.
    """
    return TimerScope(after, call_site(1) if scope is None else scope, client)


def timer(
    after: float,
    scope: str | None = None,
    *,
    soft_timeout: float | None = None,
    client: TimerClient | None = None,
) -> TimerScope:
    """``async with timer(after=30):`` is ``expires`` for coroutines, on any anyio backend.

    With ``soft_timeout`` (< ``after``), the block is cancelled locally with
    ``TimeoutError`` after that many seconds, before the server's hard deadline.
    """
    if soft_timeout is not None:
        soft_timeout = check_seconds("soft_timeout", soft_timeout)
        hard = check_seconds("after", after)
        if soft_timeout >= hard:
            raise ValueError(
                f"`soft_timeout` must be less than `after` ({hard}), got {soft_timeout}"
            )
    return TimerScope(after, call_site(1) if scope is None else scope, client, soft_timeout)
