"""aiotimer.compat.torch's API, tested without torch: these run where torch is not installed.

Nothing here imports torch; ``test_this_module_runs_with_torch_unimportable``
runs the module again in a subprocess where ``import torch`` fails.  Tests
with real processes or real waiting are marked slow.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import pickle
import re
import select
import signal
import stat
import subprocess
import sys
import threading
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import pytest
from _compat_workers import happy_local, put_requests, stuck_local

from aiotimer.compat import torch as compat

WAIT = 120.0  # generous: two shared, noisy cores
slow = pytest.mark.slow


# -- helpers -------------------------------------------------------------------


class RecordingClient(compat.TimerClient):
    def __init__(self) -> None:
        self.log: list[tuple[str, str, float]] = []

    def acquire(self, scope_id: str, expiration_time: float) -> None:
        self.log.append(("acquire", scope_id, expiration_time))

    def release(self, scope_id: str) -> None:
        self.log.append(("release", scope_id, -1))


def fork(body: Callable[[], object]) -> int:
    """Run ``body`` in a forked child that exits 0 (1 if it raised); return its pid."""
    with warnings.catch_warnings():
        # Python 3.12+ warns about forking with threads running (the server's loop).
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            body()
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    return pid


def wait_exit(pid: int, timeout: float = WAIT) -> int:
    """The child's exit code (negative: the signal that killed it)."""
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise AssertionError(f"child {pid} did not exit in {timeout}s")
        time.sleep(0.01)


def read_byte(fd: int, timeout: float = WAIT) -> bytes:
    ready, _, _ = select.select([fd], [], [], timeout)
    assert ready, "the child did not report in time"
    return os.read(fd, 1)


@pytest.fixture(autouse=True)
def _no_global_client() -> Iterator[None]:
    compat.configure(None)
    yield
    compat.configure(None)


# -- the names -----------------------------------------------------------------


def test_public_names_are_torchs_and_torchs_timer_server_is_absent() -> None:
    assert set(compat.__all__) == {
        "FileTimerClient",
        "FileTimerRequest",
        "FileTimerServer",
        "LocalTimerClient",
        "LocalTimerServer",
        "MultiprocessingRequestQueue",
        "RequestQueue",
        "TimerClient",
        "TimerRequest",
        "configure",
        "expires",
    }
    for name in compat.__all__:
        assert getattr(compat, name).__doc__, name
    # torch's TimerServer is an abstract polling base class: not provided, not faked.
    assert not hasattr(compat, "TimerServer")
    assert issubclass(compat.FileTimerClient, compat.TimerClient)
    assert issubclass(compat.LocalTimerClient, compat.TimerClient)
    assert issubclass(compat.FileTimerRequest, compat.TimerRequest)
    assert issubclass(compat.MultiprocessingRequestQueue, compat.RequestQueue)


# -- configure / expires ---------------------------------------------------------


def test_expires_default_scope_is_the_call_site() -> None:
    client = RecordingClient()
    with compat.expires(after=1, client=client):
        line = sys._getframe().f_lineno - 1
    assert client.log[0][1] == f"{__file__}#{line}"
    assert client.log[1] == ("release", f"{__file__}#{line}", -1)


def test_expires_uses_the_configured_client_and_a_wall_clock_deadline() -> None:
    client = RecordingClient()
    compat.configure(client)
    before = time.time()
    with compat.expires(after=5, scope="s"):
        pass
    after = time.time()
    (op, scope, deadline), release = client.log
    assert (op, scope) == ("acquire", "s") and release == ("release", "s", -1)
    assert before + 5 <= deadline <= after + 5


def test_an_explicit_client_wins_over_the_configured_one() -> None:
    configured, explicit = RecordingClient(), RecordingClient()
    compat.configure(configured)
    with compat.expires(after=1, scope="s", client=explicit):
        pass
    assert configured.log == [] and len(explicit.log) == 2


def test_expires_propagates_exceptions_and_releases() -> None:
    client = RecordingClient()
    with pytest.raises(ValueError, match="inside"), compat.expires(after=5, client=client):
        raise ValueError("inside")
    assert [op for op, _, _ in client.log] == ["acquire", "release"]


def test_no_client_configured_raises_runtime_error() -> None:
    with pytest.raises(RuntimeError, match="Configure timer client"), compat.expires(after=1):
        pass


def test_recursion_reacquires_one_scope() -> None:
    client = RecordingClient()

    def recurse(n: int) -> None:
        if n > 0:
            with compat.expires(after=5, client=client):
                recurse(n - 1)

    recurse(3)
    assert [op for op, _, _ in client.log] == ["acquire"] * 3 + ["release"] * 3
    # One scope for every level: the server replaces its deadline, as torch's does.
    assert len({scope for _, scope, _ in client.log}) == 1


# -- requests --------------------------------------------------------------------


def test_timer_request_equality_is_torchs() -> None:
    class Sub(compat.TimerRequest):
        pass

    request = compat.TimerRequest(1, "s", 2.0)
    assert request == compat.TimerRequest(1, "s", 2.0)
    assert request == Sub(1, "s", 2.0)  # any TimerRequest with the same fields
    assert request != compat.TimerRequest(1, "s", 3.0)
    assert request != compat.TimerRequest(2, "s", 2.0)
    assert request != compat.TimerRequest(1, "t", 2.0)
    assert request != (1, "s", 2.0)
    assert not request.__eq__(object())  # False, not NotImplemented, as in torch
    with pytest.raises(TypeError):
        hash(request)  # mutable, so unhashable (torch's too)


def test_file_timer_request_equality_is_torchs() -> None:
    request = compat.FileTimerRequest(1, "s", 2.0, 9)
    assert request == compat.FileTimerRequest(1, "s", 2.0, 9)
    assert request != compat.FileTimerRequest(1, "s", 2.0, 15)
    # Never equal to a plain TimerRequest, whichever side it is on.
    assert request != compat.TimerRequest(1, "s", 2.0)
    assert compat.TimerRequest(1, "s", 2.0) != request
    other = compat.FileTimerRequest(1, "s", 2.0, 9)
    other.version = 2
    assert request != other
    assert request.worker_pid == request.worker_id == 1
    with pytest.raises(TypeError):
        hash(request)


def test_requests_survive_pickling() -> None:
    for request in (compat.TimerRequest(1, "s", 2.0), compat.FileTimerRequest(3, "t", 4.0, 9)):
        assert pickle.loads(pickle.dumps(request)) == request


def test_to_json_is_torchs_wire_format() -> None:
    text = compat.FileTimerRequest(42, "scope", 123.5, 9).to_json()
    assert not text.endswith("\n")
    assert json.loads(text) == {
        "version": 1,
        "pid": 42,
        "scope_id": "scope",
        "expiration_time": 123.5,
        "signal": 9,
    }
    release = json.loads(compat.FileTimerRequest(42, "scope", -1).to_json())
    assert release["expiration_time"] == -1 and release["signal"] == 0
    unknown = compat.FileTimerRequest(42, "scope", 1.0)
    unknown.version = 2
    with pytest.raises(ValueError, match="`version` must be 1, got 2"):
        unknown.to_json()


def test_file_timer_client_writes_to_json_lines(tmp_path: Path) -> None:
    path = tmp_path / "f"
    os.mkfifo(path)
    read_fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        client = compat.FileTimerClient(str(path), signal=signal.SIGTERM)
        client.acquire("s", 123.5)
        client.release("s")
        del client
        data = os.read(read_fd, 64 * 1024)
    finally:
        os.close(read_fd)
    me = os.getpid()
    assert data.decode().splitlines(keepends=True) == [
        compat.FileTimerRequest(me, "s", 123.5, signal.SIGTERM).to_json() + "\n",
        compat.FileTimerRequest(me, "s", -1, 0).to_json() + "\n",
    ]


def test_a_request_longer_than_pipe_buf_is_refused(tmp_path: Path) -> None:
    client = compat.FileTimerClient(str(tmp_path / "nobody-listens"))
    with pytest.raises(RuntimeError, match="larger than"):
        client.acquire("s" * 5000, time.time() + 1)


# -- request queues ----------------------------------------------------------------


def test_request_queue_is_abstract() -> None:
    with pytest.raises(TypeError):
        compat.RequestQueue()  # type: ignore[abstract]

    class SizeOnly(compat.RequestQueue):
        def size(self) -> int:
            return 0

    with pytest.raises(TypeError):
        SizeOnly()  # type: ignore[abstract]

    class Complete(SizeOnly):
        def get(self, size: int, timeout: float) -> list[compat.TimerRequest]:
            return []

    assert Complete().get(1, 0) == []


def test_multiprocessing_request_queue_get_returns_up_to_size_in_order() -> None:
    mp_queue = mp.get_context("spawn").Queue()
    try:
        queue = compat.MultiprocessingRequestQueue(mp_queue)
        assert queue.size() == 0
        assert queue.get(1, timeout=0.01) == []
        requests = [compat.TimerRequest(i, "s", 0) for i in range(1, 4)]
        for request in requests:
            mp_queue.put(request)
        assert queue.size() == mp_queue.qsize() == 3
        # Returns as soon as it has `size` requests, long before the timeout.
        start = time.monotonic()
        assert queue.get(2, timeout=WAIT) == requests[:2]
        assert time.monotonic() - start < WAIT / 2
        assert queue.size() == 1
        assert queue.get(0, timeout=WAIT) == []
        assert queue.get(1, timeout=WAIT) == requests[2:]
        assert queue.get(5, timeout=0.01) == []
    finally:
        mp_queue.close()
        mp_queue.join_thread()


@slow
def test_multiprocessing_request_queue_waits_up_to_timeout_in_all() -> None:
    mp_queue = mp.get_context("spawn").Queue()
    try:
        queue = compat.MultiprocessingRequestQueue(mp_queue)
        mp_queue.put(compat.TimerRequest(1, "s", 0))
        start = time.monotonic()
        assert len(queue.get(5, timeout=0.3)) == 1
        elapsed = time.monotonic() - start
        assert 0.25 <= elapsed < WAIT / 2  # waited for the other four, then gave up
    finally:
        mp_queue.close()
        mp_queue.join_thread()


def test_multiprocessing_request_queue_refuses_a_nan_timeout() -> None:
    mp_queue = mp.get_context("spawn").Queue()
    try:
        with pytest.raises(ValueError, match=r"`timeout`.*nan"):
            compat.MultiprocessingRequestQueue(mp_queue).get(1, float("nan"))
    finally:
        mp_queue.close()
        mp_queue.join_thread()


@slow
def test_multiprocessing_request_queue_get_size_with_timeout_zero_takes_all() -> None:
    ctx = mp.get_context("spawn")
    mp_queue = ctx.Queue()
    producer = ctx.Process(target=put_requests, args=(mp_queue, 5))
    producer.start()
    producer.join(WAIT)  # its exit flushed every request into the pipe
    assert producer.exitcode == 0
    queue = compat.MultiprocessingRequestQueue(mp_queue)
    size = queue.size()
    requests = queue.get(size, timeout=0)
    assert size == len(requests) == 5  # the contract in torch's RequestQueue docstring
    assert [r.worker_id for r in requests] == [1, 2, 3, 4, 5]


# -- FileTimerServer with compat's FileTimerClient ----------------------------------


def hang_in_expires(fifo: str, after: float) -> None:
    client = compat.FileTimerClient(fifo)
    with compat.expires(after=after, scope="hang", client=client):
        time.sleep(600)


@slow
def test_a_hung_child_is_killed_with_sigkill(fifo: str) -> None:
    events: list[tuple[str, compat.FileTimerRequest | None]] = []
    server = compat.FileTimerServer(fifo, "run", log_event=lambda n, r: events.append((n, r)))
    server.start()
    try:
        pid = fork(lambda: hang_in_expires(fifo, 0.3))
        assert wait_exit(pid) == -signal.SIGKILL
        assert server.get_last_progress_time() >= int(time.time()) - 1  # still serving
    finally:
        server.stop()
    assert server.server.statistics().kills == 1
    assert [name for name, _ in events] == [
        "watchdog started",
        "timer expired",
        "kill worker process",
        "watchdog stopped",
    ]
    expired, killed = events[1][1], events[2][1]
    assert isinstance(expired, compat.FileTimerRequest)
    assert isinstance(killed, compat.FileTimerRequest)
    assert expired.worker_pid == killed.worker_pid == pid
    assert expired.scope_id == killed.scope_id == "hang"
    assert killed.signal == signal.SIGKILL
    assert abs(expired.expiration_time - time.time()) < WAIT
    assert abs(killed.expiration_time - expired.expiration_time) < WAIT / 4


@slow
def test_happy_path_and_run_once_applies_what_was_written(
    file_server: compat.FileTimerServer, fifo: str
) -> None:
    sent_r, sent_w = os.pipe()
    go_r, go_w = os.pipe()

    def child() -> None:
        client = compat.FileTimerClient(fifo)
        with compat.expires(after=60, scope="ok", client=client):
            pass
        for i in range(500):  # more than one read's worth of lines
            client.acquire(f"scope{i}", time.time() + 3600)
        os.write(sent_w, b"x")
        os.read(go_r, 1)  # stay alive until the parent has looked

    pid = fork(child)
    try:
        assert read_byte(sent_r) == b"x"
        file_server.run_once()
        stats = file_server.server.statistics()
        assert stats.requests == 502 and stats.rejected == 0
        assert stats.active_timers == 500 and stats.kills == 0
    finally:
        os.write(go_w, b"x")
        for fd in (sent_r, sent_w, go_r, go_w):
            os.close(fd)
    assert wait_exit(pid) == 0


@slow
def test_recursion_in_a_child_reacquires_and_nothing_is_killed(
    file_server: compat.FileTimerServer, fifo: str
) -> None:
    def recurse(client: compat.FileTimerClient, n: int) -> None:
        if n > 0:
            with compat.expires(after=0.5, client=client):
                recurse(client, n - 1)
                time.sleep(0.2)

    # 3 levels x 0.2 s overall exceed 0.5 s, but each level re-arms the one scope.
    pid = fork(lambda: recurse(compat.FileTimerClient(fifo), 3))
    assert wait_exit(pid) == 0
    assert file_server.server.statistics().kills == 0


def test_run_once_does_nothing_when_not_running(fifo: str) -> None:
    server = compat.FileTimerServer(fifo, "run")
    server.run_once()
    server.start()
    server.run_once()
    server.stop()
    server.run_once()


def test_start_twice_is_harmless(file_server: compat.FileTimerServer, fifo: str) -> None:
    threads = threading.active_count()
    inner = file_server.server
    file_server.start()
    assert threading.active_count() == threads
    assert file_server.server is inner and inner.running
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)


@pytest.mark.parametrize("realtime", ["auto", False])
def test_its_own_loop_thread_is_boosted_near_deadlines_where_permitted(
    fifo: str, realtime_permitted: bool, realtime: bool | Literal["auto"]
) -> None:
    server = compat.FileTimerServer(fifo, "run", realtime=realtime)
    server.start()
    try:
        assert server.server.realtime == (realtime_permitted and realtime == "auto")
    finally:
        server.stop()


def test_stop_before_start_and_twice_is_harmless(fifo: str) -> None:
    threads = threading.active_count()
    server = compat.FileTimerServer(fifo, "run", daemon=False)
    server.stop()
    server.start()
    assert threading.active_count() > threads  # the loop thread
    assert stat.S_IMODE(os.stat(fifo).st_mode) == 0o600
    server.stop()
    server.stop()
    assert not os.path.exists(fifo)
    assert threading.active_count() == threads
    with pytest.raises(RuntimeError, match="was stopped"):
        server.start()


def test_get_last_progress_time(fifo: str) -> None:
    server = compat.FileTimerServer(fifo, "run")
    assert abs(server.get_last_progress_time() - time.time()) <= 2  # as torch, before start
    server.start()
    assert abs(server.get_last_progress_time() - time.time()) <= 2
    server.stop()
    stopped = server.get_last_progress_time()
    assert abs(stopped - time.time()) <= 2
    assert server.get_last_progress_time() == stopped


def test_a_regular_file_at_the_path_is_refused_and_kept(tmp_path: Path) -> None:
    precious = tmp_path / "precious.txt"
    precious.write_text("keep me")
    threads = threading.active_count()
    with pytest.raises(FileExistsError, match=re.escape(repr(str(precious)))):
        compat.FileTimerServer(str(precious), "run")
    assert precious.read_text() == "keep me"
    assert threading.active_count() == threads


def test_a_regular_file_appearing_before_start_fails_start_and_leaves_no_thread(
    tmp_path: Path,
) -> None:
    path = tmp_path / "timer.fifo"
    server = compat.FileTimerServer(str(path), "run")
    path.write_text("keep me")
    threads = threading.active_count()
    with pytest.raises(FileExistsError, match=re.escape(repr(str(path)))):
        server.start()
    assert path.read_text() == "keep me"
    assert threading.active_count() == threads
    assert not server.server.running
    server.stop()  # harmless
    # A failed start leaves the server as it was: it can start once the path is free.
    path.unlink()
    server.start()
    try:
        assert stat.S_ISFIFO(os.stat(path).st_mode)
    finally:
        server.stop()
    assert threading.active_count() == threads


@slow
def test_file_timer_client_without_a_server_raises_broken_pipe(tmp_path: Path) -> None:
    client = compat.FileTimerClient(str(tmp_path / "nobody-listens"))
    with pytest.raises(BrokenPipeError), compat.expires(after=1, client=client):
        pass


# -- LocalTimerServer with compat's LocalTimerClient --------------------------------


@slow
def test_local_timer_server_kills_a_hung_spawned_child() -> None:
    ctx = mp.get_context("spawn")
    mp_queue = ctx.Queue()
    server = compat.LocalTimerServer(mp_queue, max_interval=0.01)
    server.start()
    stuck = ctx.Process(target=stuck_local, args=(mp_queue,))
    happy = ctx.Process(target=happy_local, args=(mp_queue,))
    try:
        stuck.start()
        happy.start()
        stuck.join(WAIT)
        happy.join(WAIT)
        assert stuck.exitcode == -signal.SIGKILL
        assert happy.exitcode == 0
    finally:
        for proc in (stuck, happy):
            if proc.is_alive():
                proc.kill()
                proc.join()
        server.stop()
    assert server.server.statistics().kills == 1


# -- without torch ------------------------------------------------------------------

_CHILD_ENV = "COMPAT_API_TORCH_UNIMPORTABLE"


@slow
def test_this_module_runs_with_torch_unimportable(tmp_path: Path) -> None:
    if os.environ.get(_CHILD_ENV):
        pytest.skip("already the run without torch")
    fake = tmp_path / "no_torch" / "torch"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text('raise ImportError("torch is unimportable in this test")\n')
    env: dict[str, Any] = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(fake.parent), env.get("PYTHONPATH")]))
    env[_CHILD_ENV] = "1"
    root = Path(__file__).resolve().parents[2]
    check = subprocess.run([sys.executable, "-c", "import torch"], env=env, capture_output=True)
    assert check.returncode != 0, "the fake torch package did not shadow torch"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-k",
            "not runs_with_torch_unimportable",
            __file__,
        ],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
    assert result.returncode == 0, result.stdout + result.stderr
    assert "passed" in summary and "skipped" not in summary, result.stdout
