"""Every async test runs on the default asyncio loop and on uvloop, as anyio's and uvloop's do.

Both loops run in asyncio's debug mode and the ``_loop_watch`` fixture fails a test in
which one of the watchdog's callbacks ran longer than ``SLOW_CALLBACK_DURATION`` or an
exception reached the loop's exception handler.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import gc
import inspect
import logging
import math
import os
import re
import subprocess
import sys
import threading
import time
import types
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import pytest
import pytest_asyncio

import aiotimer
from aiotimer._loops import available_loops

pytest_plugins = ["aiotimer.pytest_plugin"]

#: A callback of the watchdog's that runs longer than this fails its test (asyncio's own
#: default is 0.1 s).  Wall-clock time: a callback preempted on a busy machine can cross it.
SLOW_CALLBACK_DURATION = 0.01


def pytest_configure(config: pytest.Config) -> None:
    # pytest-asyncio's Runner calls loop.set_debug(<its asyncio_debug option>) on each loop
    # after our factory made it, so its option must say True too (its header then says so).
    config.option.asyncio_debug = True


LoopFactory = Callable[[], asyncio.AbstractEventLoop]
_debug_factories: dict[str, LoopFactory] = {}


def _debug_loop_factory(factory: LoopFactory) -> LoopFactory:
    def new_debug_loop() -> asyncio.AbstractEventLoop:
        loop = factory()
        loop.set_debug(True)
        loop.slow_callback_duration = SLOW_CALLBACK_DURATION
        if _LoopWatch.current is not None:
            _LoopWatch.current.watch(loop)
        return loop

    return new_debug_loop


def pytest_asyncio_loop_factories(config: Any, item: Any) -> Mapping[str, Any]:
    """Parametrise each async test over every loop we support, each in debug mode."""
    if not _debug_factories:
        # Made once: pytest-asyncio's loop factory fixture is parametrised by these objects.
        for name, factory in available_loops().items():
            _debug_factories[name] = _debug_loop_factory(factory)
    return _debug_factories


@pytest.fixture
def sleeper() -> Iterator[Callable[[], subprocess.Popen[bytes]]]:
    """Start idle child processes (real pids for tests); all are killed afterwards."""
    started: list[subprocess.Popen[bytes]] = []

    def start() -> subprocess.Popen[bytes]:
        proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        started.append(proc)
        return proc

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


@pytest.fixture(autouse=True)
def _no_inherited_aiotimer_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # Tests may themselves run under `aiotimer run`; a stray AIOTIMER_FD must not leak in.
    for name in [n for n in os.environ if n.startswith("AIOTIMER_")]:
        monkeypatch.delenv(name)


@pytest.fixture(scope="session")
def realtime_permitted() -> bool:
    """Whether this process may use SCHED_RR (tried on a throwaway thread)."""
    result: list[bool] = []

    def attempt() -> None:
        try:
            os.sched_setscheduler(0, os.SCHED_RR, os.sched_param(1))
        except PermissionError:
            result.append(False)
        else:
            result.append(True)

    thread = threading.Thread(target=attempt)
    thread.start()
    thread.join()
    return result[0]


# -- the loop watch: slow callbacks and exceptions that reach the loop's handler -------

_TESTS_DIR = Path(__file__).resolve().parent
_LIBRARY_DIR = Path(aiotimer.__file__).resolve().parent
_PYTEST_ASYNCIO_DIR = Path(pytest_asyncio.__file__).resolve().parent

# Both loops log 'Executing <handle or task> took 0.012 seconds' on the "asyncio" logger.
_SLOW_RE = re.compile(r"Executing (?P<handle>.*) took (?P<seconds>[0-9.]+) seconds", re.DOTALL)
# A task's repr names its coroutine and where it is: "coro=<f() running at /x.py:12>",
# or "coro=<f() done, defined at /x.py:10>" once it has returned.
_TASK_CORO_RE = re.compile(
    r"^<Task .*?coro=<(?P<name>.+?)\(\) (?:running at|done, defined at) (?P<file>[^:<>]+):\d+>",
    re.DOTALL,
)
# A handle's repr names its callback's file ("cb() at /x.py:3") on asyncio's loop only,
# and, in debug mode, on both loops where it was scheduled ("created at /x.py:12").
_HANDLE_AT_RE = re.compile(r"\) at (?P<file>[^<>\s]+?):\d+")
_CREATED_AT_RE = re.compile(r"created at (?P<file>[^<>\s]+?):\d+")
# A method's handle names only "Class.method" ("<Handle PipeChannel._readable() created at").
_CALLBACK_RE = re.compile(
    r"^<(?:Timer)?Handle (?:cancelled )?(?:when=\S+ )?(?P<name>[\w.]+)(?=[( >])"
)


def _under(file: str, directory: Path) -> bool:
    try:
        return Path(file).resolve().is_relative_to(directory)
    except OSError:  # pragma: no cover - an unresolvable path is nobody's
        return False


def _owner(file: str) -> str:
    if _under(file, _LIBRARY_DIR):
        return "aiotimer"
    if _under(file, _TESTS_DIR):
        return "tests"
    return "other"


def _defined_in(qualname: str) -> str | None:
    """The file that defines ``qualname`` (``function`` or ``Class.method``), if ours."""
    for module in list(sys.modules.values()):
        file = getattr(module, "__file__", None)
        if not file or _owner(file) == "other":
            continue
        found: object = module
        for part in qualname.split("."):
            found = getattr(found, part, None)
            if found is None:
                break
        code = getattr(inspect.unwrap(found), "__code__", None) if callable(found) else None
        if isinstance(code, types.CodeType) and _owner(code.co_filename) != "other":
            return code.co_filename
    return None


@dataclass(frozen=True)
class SlowCallback:
    """One 'Executing ... took N seconds' from a watched loop."""

    handle: str
    seconds: float
    #: of those, the seconds the loop's thread ran (the rest it waited for a CPU)
    cpu: float = math.inf

    @property
    def worked(self) -> bool:
        """Whether the callback's own work (not its wait for a CPU) took over the limit."""
        return self.cpu > SLOW_CALLBACK_DURATION

    @property
    def test_owned(self) -> bool:
        """Whether this was a step of a test's own coroutine, which may block the loop."""
        task = _TASK_CORO_RE.match(self.handle)
        if task is None:
            return False
        file = task["file"]
        # pytest-asyncio runs an async fixture's body in a task of its own wrapper's.
        return _under(file, _TESTS_DIR) or _under(file, _PYTEST_ASYNCIO_DIR)

    @property
    def owner(self) -> str:
        """Whose callback this was, as far as the repr tells: aiotimer, tests or other.

        A task's coroutine's file, or a handle's callback's (its file, or its name
        looked up in the loaded modules of ``aiotimer`` and the tests), or else the
        file that scheduled the handle.
        """
        task = _TASK_CORO_RE.match(self.handle)
        if task is not None:
            return _owner(task["file"])
        found = _HANDLE_AT_RE.search(self.handle)
        if found is not None:
            return _owner(found["file"])
        callback = _CALLBACK_RE.match(self.handle)
        file = _defined_in(callback["name"]) if callback is not None else None
        if file is not None:
            return _owner(file)
        # Else whoever scheduled it.
        found = _CREATED_AT_RE.search(self.handle)
        return _owner(found["file"]) if found is not None else "other"

    def __str__(self) -> str:
        return (
            f"[{self.owner}] {self.seconds * 1000:.1f} ms ({self.cpu * 1000:.1f} ms of CPU): "
            f"{self.handle}"
        )


class _CpuClock:
    """The CPU time one thread has run, sampled every millisecond by a thread of its own.

    The loops time a callback by the wall clock: on two busy cores a callback of
    0.2 ms of work can wait 30 ms for a CPU.  The kernel's per-thread count of
    time run (``/proc/self/task/TID/schedstat``, first field, ns) tells how much
    of a slow callback was work: that is what the watch judges.
    """

    PERIOD = 0.001

    def __init__(self, native_id: int) -> None:
        self._fd = os.open(f"/proc/self/task/{native_id}/schedstat", os.O_RDONLY)
        self.samples: collections.deque[tuple[float, float]] = collections.deque(maxlen=20_000)
        # Garbage collections (start, end): a collection of the test process's heap
        # (pytest's, torch's) is not the library's work.  ``aiotimer run`` freezes
        # its heap at start (gc.freeze) and no collection falls inside a kill burst.
        self.collections: collections.deque[tuple[float, float]] = collections.deque(maxlen=1000)
        self._gc_started = 0.0
        gc.callbacks.append(self._gc)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="test-cpu-clock")
        self._thread.start()

    def _gc(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._gc_started = time.monotonic()
        else:
            self.collections.append((self._gc_started, time.monotonic()))

    def _read(self) -> float:
        return int(os.pread(self._fd, 100, 0).split()[0]) / 1e9

    def _run(self) -> None:
        while not self._stop.wait(self.PERIOD):
            with contextlib.suppress(OSError, ValueError, IndexError):
                self.samples.append((time.monotonic(), self._read()))

    def ran(self, start: float, end: float) -> float:
        """CPU seconds the thread surely ran between two monotonic times.

        The samples nearest outside ``[start, end]`` may be far from it: the
        sampler needs the GIL, which the loop's thread holds while it works, and
        on two busy cores it waits for a CPU too.  Whatever the thread ran in
        those gaps (its previous callback, the test's code) is not the
        callback's, so the gaps are taken off as if the thread ran all through
        them: a lower bound, which is what a verdict of "blocking" needs.
        """
        samples = list(self.samples)
        before = [(at, cpu) for at, cpu in samples if at <= start]
        after = [(at, cpu) for at, cpu in samples if at >= end]
        since, first = before[-1] if before else (samples[0] if samples else (start, 0.0))
        until, last = after[0] if after else (time.monotonic(), self._read())
        gaps = max(0.0, start - since) + max(0.0, until - end)
        collecting = sum(
            min(end, done) - max(start, began)
            for began, done in list(self.collections)
            if done > start and began < end
        )
        return max(0.0, last - first - gaps - collecting)

    def close(self) -> None:
        with contextlib.suppress(ValueError):
            gc.callbacks.remove(self._gc)
        self._stop.set()
        self._thread.join()
        os.close(self._fd)


class _SlowCallbackLog(logging.Handler):
    """Collects the slow-callback warnings the loops running on one thread log."""

    def __init__(self, thread: int, cpu: _CpuClock) -> None:
        super().__init__(logging.WARNING)
        self.thread = thread
        self.cpu = cpu
        self.seen: list[SlowCallback] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.thread != self.thread:
            return
        found = _SLOW_RE.fullmatch(record.getMessage())
        if found is not None:
            seconds = float(found["seconds"])
            end = time.monotonic()
            ran = self.cpu.ran(end - seconds, end)
            self.seen.append(SlowCallback(found["handle"], seconds, ran))


@dataclass
class _LoopWatch:
    """What one async test's loops reported."""

    #: The running test's watch, for the loop factory.
    current: ClassVar[_LoopWatch | None] = None

    loops: list[asyncio.AbstractEventLoop] = field(default_factory=list)
    exceptions: list[str] = field(default_factory=list)

    def watch(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loops.append(loop)
        loop.set_exception_handler(self._handle_exception)

    def _handle_exception(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        parts = [str(context.get("message", "(no message)"))]
        for key in ("exception", "task", "future", "handle", "protocol", "transport"):
            if key in context:
                parts.append(f"{key}: {context[key]!r}")
        self.exceptions.append("\n      ".join(parts))
        loop.default_exception_handler(context)


@pytest.fixture(autouse=True)
def _loop_watch(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail an async test whose loop ran a slow callback or handled an exception.

    Every async test's loop (asyncio's and uvloop's) runs in debug mode with
    ``slow_callback_duration = SLOW_CALLBACK_DURATION`` (10 ms), and both log each
    callback that ran longer as a WARNING on the ``asyncio`` logger; this collects
    those, and every call of the loop's exception handler (wrapped around the default
    one, which still logs), from the loop's creation until it is closed.  At teardown
    the test fails, listing them, unless:

    * A slow callback is a step of the test's own coroutine: a Task whose coroutine is
      defined under ``tests/`` (the test function or a helper there), or pytest-asyncio's
      wrapper running an async fixture's body.  Test code may block (``subprocess.run``
      and the like).  Nor does the standard library's and other packages' own machinery
      (``_connect_pipes``, ``_read_from_self``: microseconds of work, so over 10 ms it
      was preempted, not blocking).  What counts: the watchdog's tasks and callbacks
      (code under ``aiotimer/``) and callbacks a test schedules itself.  It is decided
      from the repr the loop logs: a task's names its coroutine and file (``coro=<name() running at
      /path/file.py:N>``); a handle's names its callback (and on asyncio's loop that
      callback's file), and where it was scheduled (``created at``).  Library code a
      test awaits inline runs in the test's task, so it is counted as the test's.
    * The test is marked ``@pytest.mark.allow_slow_callbacks(reason)``: it blocks the
      loop on purpose.

    * The callback's own work took under the limit: the loops time callbacks by the wall
      clock, and on two busy cores a callback of 0.2 ms of work waits 30 ms for a CPU;
      the thread's CPU time over the callback (``_CpuClock``, sampled every ms from the
      kernel's count) is what counts: at least what it ran, less the garbage
      collections of the test process's heap that fell in it.

    Limits: uvloop times only callbacks it queues (``call_soon``, timers, task steps),
    not its I/O callbacks; asyncio's loop times all.  A callback that blocks in a
    syscall (a ``read`` of a FIFO, an ``fsync``) uses no CPU meanwhile: it is caught
    by the isolation tests, which time the kill itself, not by this watch.
    """
    if not pytest_asyncio.is_async_test(request.node):
        yield
        return
    watch = _LoopWatch()
    cpu = _CpuClock(threading.get_native_id())
    log = _SlowCallbackLog(threading.get_ident(), cpu)
    logger = logging.getLogger("asyncio")
    level = logger.level
    if not logger.isEnabledFor(logging.WARNING):
        logger.setLevel(logging.WARNING)
    logger.addHandler(log)
    _LoopWatch.current = watch
    try:
        # This fixture is set up before pytest-asyncio's runner, so it is torn down after
        # the runner closed the loop: what the loop reports while shutting down counts.
        yield
        # An exception no one retrieved is reported when its future is collected.
        gc.collect()
    finally:
        _LoopWatch.current = None
        logger.removeHandler(log)
        cpu.close()
        logger.setLevel(level)
    problems: list[str] = []
    if not watch.loops:
        problems.append("the test's loop was not made by the debug loop factory")
    for loop in watch.loops:
        if not loop.get_debug() or loop.slow_callback_duration != SLOW_CALLBACK_DURATION:
            problems.append(f"{loop!r} ran with debug={loop.get_debug()}")
    allowed = request.node.get_closest_marker("allow_slow_callbacks")
    if allowed is not None and not (allowed.args or allowed.kwargs.get("reason")):
        problems.append("@pytest.mark.allow_slow_callbacks needs a reason")
    if allowed is None:
        slow = [s for s in log.seen if not s.test_owned and s.owner != "other" and s.worked]
        if slow:
            problems.append(
                f"{len(slow)} callback(s) ran longer than {SLOW_CALLBACK_DURATION * 1000:g} ms:"
            )
            problems.extend(f"  {s}" for s in slow)
    if watch.exceptions:
        problems.append(f"{len(watch.exceptions)} call(s) of the loop's exception handler:")
        problems.extend(f"  {e}" for e in watch.exceptions)
    if problems:
        pytest.fail("\n".join(problems), pytrace=False)
