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
from ._protocol import ENV_DUMP_DIR, ENV_DUMP_SIGNAL, ENV_FD

__all__ = ["Worker", "WorkerSet", "start_worker_process"]

# How long closing waits for a worker it killed to be reaped.
_CLOSE_WAIT = 5.0


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
    try:
        process = await asyncio.create_subprocess_exec(
            program, *args, env=child_env, pass_fds=pass_fds, **kwargs
        )
    except BaseException:
        os.close(read_fd)
        raise
    finally:
        os.close(write_fd)
    return process, read_fd


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
        self.reaper = reaper
        self.process_group = process_group
        #: scopes of this worker's expired timers, in the order they expired
        #: (at most the first 100 of each expiry)
        self.expired_scopes: list[str] = []
        #: whether the watchdog signalled this worker
        self.killed_by_watchdog = False
        self.watched: _Watch | None = None

    def __repr__(self) -> str:
        return f"<Worker pid={self.pid} returncode={self.returncode}>"

    @property
    def pid(self) -> int:
        """The worker's process id."""
        return self._process.pid

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
        # The status: asyncio's child watcher reaps the worker and records it,
        # in this loop turn or, with a watcher thread, a little later.
        for _ in range(1000):
            if self._process.returncode is not None:
                return self._process.returncode
            await asyncio.sleep(0.001)
        if watched.returncode is not None:  # read when it exited, left for the watcher
            return watched.returncode
        return await self._process.wait()

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
        self._workers: set[Worker] = set()

    def __len__(self) -> int:
        return len(self._workers)

    def snapshot(self) -> frozenset[Worker]:
        """The workers still running."""
        return frozenset(self._workers)

    def add(self, worker: Worker) -> None:
        """Track a worker just spawned."""
        self._workers.add(worker)

    def exited(self, worker: Worker, returncode: int | None, timers_cleared: int) -> None:
        """``worker`` exited (its pidfd says so): report it, with its exit status."""
        self._workers.discard(worker)
        event = WorkerExited(worker.pid, returncode, timers_cleared, worker)
        if returncode is not None:
            self._events.emit(event)
            return
        # asyncio's child watcher reaped it first: its status comes with wait().

        def report(task: asyncio.Task[int]) -> None:
            status = None if task.cancelled() or task.exception() else task.result()
            self._events.emit(WorkerExited(event.pid, status, timers_cleared, worker))

        asyncio.get_running_loop().create_task(worker.wait()).add_done_callback(report)

    async def kill_all(self) -> None:
        """SIGKILL every worker still running and wait for each to be reaped."""
        workers = list(self._workers)
        for worker in workers:
            if worker.returncode is None:
                worker.kill()
        for worker in workers:
            try:
                await asyncio.wait_for(worker.wait(), _CLOSE_WAIT)
            except TimeoutError:
                logger.error("worker %d did not exit after SIGKILL", worker.pid)
