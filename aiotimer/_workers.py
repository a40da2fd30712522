"""Workers: the processes a ``TimerServer`` spawned, as their launcher sees them."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

from ._events import EventBus, WorkerExited, logger
from ._linux import ProcessGone, die_with_parent
from ._processes import SpawnedTree
from ._protocol import ENV_DUMP_DIR, ENV_DUMP_SIGNAL, ENV_FD, ENV_FD_INODE

__all__ = ["Worker", "WorkerSet", "start_worker_process"]

# How long closing waits for a worker it killed to be reaped.
_CLOSE_WAIT = 5.0
# How long wait() gives an exited worker's pipes to reach their end.
_PIPES_WAIT = 0.1


def _child_setup(keep: Sequence[int], then: Callable[[], object] | None) -> Callable[[], None]:
    """A ``preexec_fn``: the worker dies with this process and inherits only the fds it should.

    It is SIGKILLed if this process dies, however it dies (``PR_SET_PDEATHSIG``).
    Every fd but stdin, stdout, stderr and ``keep`` is marked close-on-exec (not
    closed: uvloop still uses some between fork and exec): uvloop has no
    ``close_fds``, and its workers would otherwise inherit the launcher's fds.
    """
    parent = os.getpid()
    kept = frozenset((0, 1, 2, *keep))

    def preexec() -> None:
        die_with_parent(parent)
        for name in os.listdir("/proc/self/fd"):
            fd = int(name)
            if fd not in kept:
                with contextlib.suppress(OSError):
                    os.set_inheritable(fd, False)
        if then is not None:
            then()

    return preexec


async def start_worker_process(
    program: str | os.PathLike[str],
    args: Sequence[str | os.PathLike[str]],
    *,
    env: Mapping[str, str] | None,
    dump_signal: int | None,
    process_group: bool,
    dump_dir: os.PathLike[str] | str | None = None,
    **kwargs: Any,
) -> tuple[asyncio.subprocess.Process, int]:
    """Start a worker with a request pipe; return it and the pipe's read end.

    The worker finds the pipe's write end through ``AIOTIMER_FD`` and the
    signal to register a stack dump on through ``AIOTIMER_DUMP_SIGNAL``.
    """
    read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
    child_env = dict(os.environ if env is None else env)
    child_env[ENV_FD] = str(write_fd)
    child_env[ENV_FD_INODE] = str(os.fstat(write_fd).st_ino)
    if dump_signal is not None:
        child_env[ENV_DUMP_SIGNAL] = str(dump_signal)
    else:
        child_env.pop(ENV_DUMP_SIGNAL, None)
    if dump_dir is not None:
        child_env[ENV_DUMP_DIR] = os.fspath(dump_dir)
    else:
        child_env.pop(ENV_DUMP_DIR, None)
    pass_fds = (*kwargs.pop("pass_fds", ()), write_fd)
    if process_group:
        kwargs["start_new_session"] = True
    kwargs["preexec_fn"] = _child_setup(pass_fds, kwargs.get("preexec_fn"))
    loop = asyncio.get_running_loop()
    limit = kwargs.pop("limit", 2**16)
    try:
        # As asyncio.create_subprocess_exec, with a protocol that says when the
        # exit status is known (see ``_ExitStatus``).
        transport, protocol = await loop.subprocess_exec(
            lambda: _ExitStatus(limit, loop),
            program,
            *args,
            # create_subprocess_exec's defaults (inherit), not subprocess_exec's (PIPE)
            stdin=kwargs.pop("stdin", None),
            stdout=kwargs.pop("stdout", None),
            stderr=kwargs.pop("stderr", None),
            env=child_env,
            pass_fds=pass_fds,
            **kwargs,
        )
    except BaseException:
        os.close(read_fd)
        raise
    finally:
        os.close(write_fd)
    return asyncio.subprocess.Process(transport, protocol, loop), read_fd


class _ExitStatus(asyncio.subprocess.SubprocessStreamProtocol):
    """asyncio's protocol for a subprocess, with a future done when its exit status is known.

    ``Process.wait()`` waits for the worker's pipes to close as well, which a
    daemon it left behind may keep open; this future does not, and it needs no
    polling: asyncio's child watcher calls ``process_exited`` once it has reaped
    the process, on every loop and Python version.
    """

    def __init__(self, limit: int, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(limit=limit, loop=loop)
        self.status: asyncio.Future[int] = loop.create_future()

    def process_exited(self) -> None:
        # Read first: the base class may close and drop the transport.
        transport = self._transport  # type: ignore[attr-defined]
        returncode = transport.get_returncode() if transport is not None else None
        super().process_exited()
        if not self.status.done() and returncode is not None:
            self.status.set_result(returncode)


class _Watch(Protocol):
    """How the server watches a worker (a ``WatchedProcess``): its exit, a pidfd signal."""

    @property
    def exited(self) -> bool:
        """Whether the process has exited."""

    @property
    def returncode(self) -> int | None:
        """Its exit status, if the server could read it when it exited."""

    def exit_future(self) -> asyncio.Future[None]:
        """Done once the process has exited (seen through its pidfd)."""

    def send_signal(self, sig: int, *, group: bool = False) -> None:
        """Signal the process through its pidfd."""


class Worker:
    """A worker process that a ``TimerServer`` spawned and watches.

    Mirrors ``asyncio.subprocess.Process``: ``pid``, ``returncode``, ``stdin``,
    ``stdout``, ``stderr`` (streams when asked for with ``PIPE``) and ``wait()``.
    """

    def __init__(
        self,
        process: asyncio.subprocess.Process,
        *,
        reaper: Callable[..., object] | None,
        process_group: bool,
    ) -> None:
        self._process = process
        #: what the watchdog's core knows of this worker (and records about it)
        self.tree = SpawnedTree(process.pid, reaper, process_group)
        self.watched: _Watch | None = None

    def __repr__(self) -> str:
        return f"<Worker pid={self.pid} returncode={self.returncode}>"

    @property
    def pid(self) -> int:
        """The worker's process id."""
        return self._process.pid

    @property
    def reaper(self) -> Callable[..., object] | None:
        """The reaper for this worker's expiries (``None``: the server's)."""
        return self.tree.reaper

    @property
    def process_group(self) -> bool:
        """Whether the worker leads a process group of its own."""
        return self.tree.process_group

    @property
    def expired_scopes(self) -> list[str]:
        """Scopes of this worker's expired timers, in the order they expired.

        At most the first 100 of each expiry; its descendants' are not listed.
        """
        return self.tree.expired_scopes

    @property
    def killed_by_watchdog(self) -> bool:
        """Whether the watchdog signalled this worker."""
        return self.tree.killed_by_watchdog

    @property
    def returncode(self) -> int | None:
        """Exit status once it has exited (negative: killed by that signal), else ``None``."""
        return self._process.returncode

    @property
    def stdin(self) -> asyncio.StreamWriter | None:
        """The worker's stdin stream, when spawned with ``stdin=PIPE``."""
        return self._process.stdin

    @property
    def stdout(self) -> asyncio.StreamReader | None:
        """The worker's stdout stream, when spawned with ``stdout=PIPE``."""
        return self._process.stdout

    @property
    def stderr(self) -> asyncio.StreamReader | None:
        """The worker's stderr stream, when spawned with ``stderr=PIPE``."""
        return self._process.stderr

    async def wait(self) -> int:
        """Wait for the worker to exit and return its return code.

        Unlike ``asyncio.subprocess.Process.wait``, this returns when the
        process has exited even if a descendant of it (a daemon) still holds its
        stdout or stderr open: asyncio waits for those pipes to close as well.
        """
        watched = self.watched
        if watched is None:
            return await self._process.wait()
        await asyncio.shield(watched.exit_future())
        status = self._process.returncode
        if status is None:
            status = watched.returncode  # read when it exited, left for the watcher
        if status is None:
            # asyncio's child watcher reaped it first: its status comes from there.
            status = await asyncio.shield(self.exit_status())
        # Its pipes usually reach their end now too: a moment for asyncio to see
        # it and close the transport (not for ever: a daemon may hold them).
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._process.wait()), _PIPES_WAIT)
        return status

    def exit_status(self) -> asyncio.Future[int]:
        """Done with the exit status once asyncio's child watcher has reaped the worker."""
        protocol = self._process._protocol  # type: ignore[attr-defined]
        if isinstance(protocol, _ExitStatus):
            return protocol.status
        return asyncio.ensure_future(self._process.wait())

    def send_signal(self, sig: int) -> None:
        """Send ``sig`` to the worker (through its pidfd while it is watched)."""
        if self.watched is not None and not self.watched.exited:
            with contextlib.suppress(ProcessGone):
                self.watched.send_signal(sig)
            return
        if self._process.returncode is None:
            self._process.send_signal(sig)

    def terminate(self) -> None:
        """Send SIGTERM."""
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        """Send SIGKILL."""
        self.send_signal(signal.SIGKILL)


class WorkerSet:
    """The workers a server spawned and has not yet seen exit; it reports their exits."""

    def __init__(self, events: EventBus) -> None:
        self._events = events
        self._workers: dict[int, Worker] = {}  # by pid
        # Exits seen whose status is still to come: reported before the server closes.
        self._reporting: set[asyncio.Future[int]] = set()

    def __len__(self) -> int:
        return len(self._workers)

    def get(self, pid: int) -> Worker | None:
        """The running worker ``pid``, if it is one."""
        return self._workers.get(pid)

    def snapshot(self) -> frozenset[Worker]:
        """The workers still running."""
        return frozenset(self._workers.values())

    def add(self, worker: Worker) -> None:
        """Track a worker just spawned."""
        self._workers[worker.pid] = worker

    def exited(self, worker: Worker, returncode: int | None, timers_cleared: int) -> None:
        """``worker`` exited (its pidfd says so): report it, once, with its exit status."""
        self._workers.pop(worker.pid, None)
        status = returncode if returncode is not None else worker.returncode
        if worker.returncode is None:
            # Its status was read through the pidfd, but asyncio's child watcher has
            # not reaped it yet (a watcher thread on Python 3.11's own loop runs late
            # on a busy machine): closing waits for that, or the loop closes on a
            # transport asyncio still thinks is running.
            reaped = worker.exit_status()
            self._reporting.add(reaped)
            reaped.add_done_callback(self._reporting.discard)
        if status is not None:
            self._events.emit(WorkerExited(worker.pid, status, timers_cleared, worker))
            return
        # asyncio's child watcher reaped it first (a watcher thread on Python
        # 3.11's own loop): its status comes from there, in a moment.
        future = worker.exit_status()
        self._reporting.add(future)

        def report(future: asyncio.Future[int]) -> None:
            self._reporting.discard(future)
            status = None if future.cancelled() or future.exception() else future.result()
            self._events.emit(WorkerExited(worker.pid, status, timers_cleared, worker))

        future.add_done_callback(report)

    async def kill_all(self) -> None:
        """SIGKILL every worker still running, wait for each to be reaped and reported."""
        workers = list(self._workers.values())
        for worker in workers:
            if worker.returncode is None:
                worker.kill()
        for worker in workers:
            try:
                await asyncio.wait_for(worker.wait(), _CLOSE_WAIT)
            except TimeoutError:
                logger.error("worker %d did not exit after SIGKILL", worker.pid)
        if self._reporting:  # every exit seen is reported exactly once, before the server closes
            await asyncio.wait(list(self._reporting), timeout=_CLOSE_WAIT)
