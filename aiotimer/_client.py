"""Worker side: ``expires()`` and ``timer()``, and the clients that carry their requests."""

from __future__ import annotations

import abc
import faulthandler
import os
import stat
import sys
import threading
import time
import weakref
from collections.abc import Mapping
from types import TracebackType
from typing import Any, Literal

from ._exceptions import ClientNotConfiguredError, ServerUnavailableError
from ._protocol import (
    ENV_DUMP_DIR,
    ENV_DUMP_SIGNAL,
    ENV_FD,
    dump_file_name,
    encode_acquire_stamped,
    encode_hello,
    encode_release,
)
from ._validate import check_seconds

__all__ = [
    "PipeClient",
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
    ) -> None:
        try:
            mode = os.fstat(fd).st_mode
        except OSError as exc:
            raise ServerUnavailableError(f"timer pipe fd {fd} is not open: {exc}") from None
        if not stat.S_ISFIFO(mode):
            raise ServerUnavailableError(f"timer pipe fd {fd} is not a pipe")
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
                f"TimerServer (the environment has no {ENV_FD})"
            )
        try:
            fd = int(raw)
            dump = int(env.get(ENV_DUMP_SIGNAL, "0") or 0)
        except ValueError:
            raise ClientNotConfiguredError(
                f"{ENV_FD}={raw!r} / {ENV_DUMP_SIGNAL}={env.get(ENV_DUMP_SIGNAL)!r} "
                "must be integers"
            ) from None
        return cls(fd, dump_signal=dump or None, dump_dir=env.get(ENV_DUMP_DIR) or None)

    def _register_dump(self) -> None:
        """Have ``faulthandler`` write this process's stacks on the dump signal."""
        if not self._dump_signal:
            return
        if self._dump_dir is None:
            faulthandler.register(self._dump_signal, all_threads=True, chain=False)
            return
        try:
            # Kept open: faulthandler writes to the fd from a signal handler.
            self._dump_file = open(  # noqa: SIM115
                os.path.join(self._dump_dir, dump_file_name(_pid)), "w"
            )
        except OSError:
            faulthandler.register(self._dump_signal, all_threads=True, chain=False)
            return
        faulthandler.register(
            self._dump_signal, file=self._dump_file, all_threads=True, chain=False
        )

    def _send(self, frame: bytes) -> None:
        if self._greeted_pid != _pid:  # a new process (this one, or a forked child)
            self._greeted_pid = _pid
            self._register_dump()
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
    """The configured client, or the one found in the environment of a spawned worker."""
    global _client
    client = _client
    if client is None:
        with _client_lock:
            if _client is None:
                _client = PipeClient.from_environ()
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
                except TimeoutError:
                    self._state = "soft-expired"
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
