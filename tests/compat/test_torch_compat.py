"""torch's own timer tests, re-expressed against aiotimer, with real torch clients.

Mirrors torch's api_test, local_timer_test, file_based_local_timer_test and
local_timer_example: happy path, stuck worker killed with SIGKILL, recursive
same-scope re-acquire, exceptions, no client, no server, many clients, exit
before release, unknown release; plus the hostile inputs torch does not survive.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import stat
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pytest

pytest.importorskip("torch")

from _torch_workers import recursive, stuck_local

from aiotimer import RequestRejected
from aiotimer.compat import torch as compat

pytestmark = [pytest.mark.slow, pytest.mark.torch]

WAIT = 120.0


def run_py(code: str, **kwargs: object) -> subprocess.Popen[str]:
    return subprocess.Popen(  # type: ignore[call-overload, no-any-return]
        [sys.executable, "-c", textwrap.dedent(code)], text=True, **kwargs
    )


def wait_until(predicate: Callable[[], bool], timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.02)


TORCH_FILE_WORKER = """
    import os, sys, time
    import torch.distributed.elastic.timer as timer
    timer.configure(timer.FileTimerClient(sys.argv[1]))
    {body}
"""


def torch_file_worker(fifo: str, body: str, *, capture: bool = False) -> subprocess.Popen[str]:
    code = textwrap.dedent(TORCH_FILE_WORKER).format(
        body=textwrap.indent(textwrap.dedent(body), "")
    )
    stdout = subprocess.PIPE if capture else None
    return subprocess.Popen([sys.executable, "-c", code, fifo], text=True, stdout=stdout)


# -- FileTimerServer with torch's FileTimerClient -----------------------------


def test_happy_path(file_server: compat.FileTimerServer, fifo: str) -> None:
    proc = torch_file_worker(fifo, "with timer.expires(after=10):\n    time.sleep(0.1)")
    assert proc.wait(WAIT) == 0
    wait_until(lambda: file_server.server.statistics().requests == 2)
    stats = file_server.server.statistics()
    assert stats.kills == 0 and stats.rejected == 0 and stats.active_timers == 0


def test_stuck_worker_is_killed_with_sigkill_and_the_server_survives(
    file_server: compat.FileTimerServer, fifo: str
) -> None:
    proc = torch_file_worker(fifo, "with timer.expires(after=0.3):\n    time.sleep(600)")
    assert proc.wait(WAIT) == -signal.SIGKILL
    assert file_server.server.statistics().kills == 1
    # torch 2.13 kills its own process here; we are still running, and still serving.
    assert file_server.get_last_progress_time() >= int(time.time()) - 1
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)


def test_torch_signal_le_zero_only_logs(file_server: compat.FileTimerServer, fifo: str) -> None:
    body = """
        timer.configure(timer.FileTimerClient(sys.argv[1], signal=0))
        with timer.expires(after=0.2):
            time.sleep(1.0)
    """
    proc = torch_file_worker(fifo, body)
    assert proc.wait(WAIT) == 0
    stats = file_server.server.statistics()
    assert stats.expiries == 1 and stats.kills == 0


def test_ten_clients_twenty_requests_each_none_lost(
    file_server: compat.FileTimerServer, fifo: str
) -> None:
    body = """
        pids = []
        for c in range(10):
            pid = os.fork()
            if pid == 0:
                client = timer.FileTimerClient(sys.argv[1])
                for i in range(20):
                    client.acquire(f"scope{i}", time.time() + 60)
                for i in range(20):
                    client.release(f"scope{i}")
                os._exit(0)
            pids.append(pid)
        codes = [os.waitstatus_to_exitcode(os.waitpid(p, 0)[1]) for p in pids]
        assert codes == [0] * 10, codes
    """
    reasons: list[str] = []
    file_server.server.events.subscribe(
        lambda e: reasons.append(e.reason) if isinstance(e, RequestRejected) else None
    )
    proc = torch_file_worker(fifo, body)
    assert proc.wait(WAIT) == 0

    # Every line is read and decoded.  On a loaded machine a client may exit (and
    # be reaped) before the server reads its last lines: those name a process
    # that no longer exists and are refused as such, which loses nothing.
    deadline = time.monotonic() + WAIT
    while True:
        stats = file_server.server.statistics()
        if stats.requests + stats.rejected == 10 * 20 * 2:
            break
        assert time.monotonic() < deadline, (stats, reasons, file_server.server.workers)
        time.sleep(0.02)
    assert all(reason.endswith("does not exist") for reason in reasons), reasons
    assert stats.active_timers == 0 and stats.kills == 0


def test_exit_before_release_kills_nothing(file_server: compat.FileTimerServer, fifo: str) -> None:
    body = """
        timer.FileTimerClient(sys.argv[1]).acquire("abandoned", time.time() + 1.0)
        os._exit(0)  # torch's interpreter teardown alone can outlast a short deadline
    """
    proc = torch_file_worker(fifo, body)
    assert proc.wait(WAIT) == 0
    time.sleep(1.5)
    stats = file_server.server.statistics()
    # Read before or after the exit (then refused: that pid is gone); never acted on.
    assert stats.requests + stats.rejected == 1
    assert stats.expiries == 0 and stats.kills == 0


def test_release_of_an_unknown_scope_is_harmless(
    file_server: compat.FileTimerServer, fifo: str
) -> None:
    proc = torch_file_worker(fifo, 'timer.FileTimerClient(sys.argv[1]).release("never")')
    assert proc.wait(WAIT) == 0
    wait_until(lambda: file_server.server.statistics().requests == 1)
    assert file_server.server.statistics().rejected == 0


def test_log_event_gets_torch_events_with_requests(fifo: str) -> None:
    events: list[tuple[str, object]] = []
    server = compat.FileTimerServer(fifo, "run", log_event=lambda n, r: events.append((n, r)))
    server.start()
    try:
        proc = torch_file_worker(
            fifo, "with timer.expires(after=0.2, scope='s'):\n    time.sleep(600)"
        )
        assert proc.wait(WAIT) == -signal.SIGKILL
    finally:
        server.stop()
    names = [n for n, _ in events]
    assert names == ["watchdog started", "timer expired", "kill worker process", "watchdog stopped"]
    expired = events[1][1]
    assert isinstance(expired, compat.FileTimerRequest)
    assert expired.worker_pid == proc.pid and expired.scope_id == "s"
    assert abs(expired.expiration_time - time.time()) < 60
    assert json_fields(expired.to_json()) == {
        "version",
        "pid",
        "scope_id",
        "expiration_time",
        "signal",
    }


def json_fields(text: str) -> set[str]:
    import json

    return set(json.loads(text))


def test_client_without_server_raises_broken_pipe(tmp_path: Path) -> None:
    from torch.distributed.elastic.timer import FileTimerClient

    missing = str(tmp_path / "nobody-listens")
    for client in (FileTimerClient(missing), compat.FileTimerClient(missing)):
        with pytest.raises(BrokenPipeError):
            client.acquire("s", time.time() + 1)


def test_stop_removes_the_fifo_and_clients_then_see_broken_pipe(fifo: str) -> None:
    server = compat.FileTimerServer(fifo, "run")
    server.start()
    assert stat.S_IMODE(os.stat(fifo).st_mode) == 0o600
    server.stop()
    assert not os.path.exists(fifo)
    with pytest.raises(BrokenPipeError):
        compat.FileTimerClient(fifo).acquire("s", time.time() + 1)


def test_a_path_that_is_not_a_fifo_is_refused_not_deleted(tmp_path: Path) -> None:
    precious = tmp_path / "precious.txt"
    precious.write_text("keep me")
    with pytest.raises(FileExistsError, match="exists and is not a FIFO"):
        compat.FileTimerServer(str(precious), "run")
    assert precious.read_text() == "keep me"


def test_kill_self_is_opt_in_and_reproduces_torch(tmp_path: Path) -> None:
    code = f"""
        import os, sys, time
        from aiotimer.compat import torch as compat
        server = compat.FileTimerServer({str(tmp_path / "f")!r}, "run", kill_self=True)
        server.start()
        pid = os.fork()
        if pid == 0:
            client = compat.FileTimerClient({str(tmp_path / "f")!r})
            with compat.expires(after=0.2, client=client):
                time.sleep(600)
            os._exit(0)
        time.sleep(60)
    """
    proc = run_py(code)
    assert proc.wait(WAIT) == -signal.SIGKILL


# -- hostile input -------------------------------------------------------------


def test_requests_naming_pid_1_a_foreign_pid_or_the_server_signal_nothing(
    file_server: compat.FileTimerServer, fifo: str
) -> None:
    foreign = os.getppid()  # our parent: it does not descend from the server
    body = f"""
        for pid in (1, {foreign}, {os.getpid()}):
            line = timer.FileTimerRequest(pid, "evil", time.time() + 0.1, 9).to_json() + "\\n"
            fd = os.open(sys.argv[1], os.O_WRONLY)
            os.write(fd, line.encode())
            os.close(fd)
    """
    proc = torch_file_worker(fifo, body)
    assert proc.wait(WAIT) == 0
    wait_until(lambda: file_server.server.statistics().rejected == 3)
    time.sleep(0.3)
    stats = file_server.server.statistics()
    assert stats.kills == 0 and stats.active_timers == 0
    os.kill(foreign, 0)  # still alive (as are we)


def test_ten_thousand_malformed_lines_lose_no_valid_request(
    file_server: compat.FileTimerServer, fifo: str
) -> None:
    body = """
        import json
        fd = os.open(sys.argv[1], os.O_WRONLY)
        bad = [b"{not json\\n", b"[1,2]\\n", b'{"pid": "x"}\\n', b"\\xff\\xfe\\n",
               b'{"pid": 1, "scope_id": "s", "expiration_time": NaN, "signal": 9}\\n']
        me = os.getpid()
        valid = 0
        for i in range(10_000):
            os.write(fd, bad[i % len(bad)])
            if i % 10 == 0:
                os.write(fd, (json.dumps({"version": 1, "pid": me, "scope_id": f"s{i}",
                    "expiration_time": time.time() + 3600, "signal": 9}) + "\\n").encode())
                valid += 1
        os.write(fd, (json.dumps({"version": 1, "pid": me, "scope_id": "s0",
            "expiration_time": -1, "signal": 0}) + "\\n").encode())
        print(valid + 1, flush=True)
        time.sleep(600)
    """
    proc = torch_file_worker(fifo, body, capture=True)
    try:
        assert proc.stdout is not None
        valid = int(proc.stdout.readline())
        wait_until(lambda: file_server.server.statistics().requests == valid)
        stats = file_server.server.statistics()
        assert stats.rejected == 10_000
        assert stats.active_timers == valid - 2  # every acquire but the released one
    finally:
        proc.kill()
        proc.wait()
        assert proc.stdout is not None
        proc.stdout.close()


# -- LocalTimerServer with torch's LocalTimerClient -----------------------------


@pytest.fixture
def mp_ctx() -> mp.context.SpawnContext:
    return mp.get_context("spawn")


def test_local_stuck_worker_is_killed(mp_ctx: mp.context.SpawnContext) -> None:
    queue = mp_ctx.Queue()
    server = compat.LocalTimerServer(queue, max_interval=0.01)
    server.start()
    try:
        proc = mp_ctx.Process(target=stuck_local, args=(queue,))
        proc.start()
        proc.join(WAIT)
        assert proc.exitcode == -signal.SIGKILL
    finally:
        server.stop()


def test_local_recursive_same_scope_reacquire(mp_ctx: mp.context.SpawnContext) -> None:
    queue = mp_ctx.Queue()
    server = compat.LocalTimerServer(queue)
    server.start()
    try:
        # Each level re-acquires the same scope, so only the innermost deadline counts:
        # 4 levels x 0.2 s overall exceed 0.5 s, yet nothing is killed (as in torch).
        ok = mp_ctx.Process(target=recursive, args=(queue, 4, 0.2))
        ok.start()
        ok.join(WAIT)
        assert ok.exitcode == 0
        # The innermost level itself overruns: killed.
        stuck = mp_ctx.Process(target=recursive, args=(queue, 2, 0.8))
        stuck.start()
        stuck.join(WAIT)
        assert stuck.exitcode == -signal.SIGKILL
    finally:
        server.stop()


# -- the compat API itself ----------------------------------------------------


class RecordingClient(compat.TimerClient):
    def __init__(self) -> None:
        self.log: list[tuple[str, str, float]] = []

    def acquire(self, scope_id: str, expiration_time: float) -> None:
        self.log.append(("acquire", scope_id, expiration_time))

    def release(self, scope_id: str) -> None:
        self.log.append(("release", scope_id, -1))


def test_expires_propagates_exceptions_and_releases() -> None:
    client = RecordingClient()
    with pytest.raises(ValueError, match="inside"), compat.expires(after=5, client=client):
        raise ValueError("inside")
    assert [op for op, _, _ in client.log] == ["acquire", "release"]
    assert abs(client.log[0][2] - (time.time() + 5)) < 5  # a wall-clock deadline, as in torch


def test_expires_default_scope_is_the_call_site() -> None:
    client = RecordingClient()
    with compat.expires(after=1, client=client):
        line = sys._getframe().f_lineno - 1
    assert client.log[0][1] == f"{__file__}#{line}"


def test_no_client_configured_raises_runtime_error() -> None:
    compat.configure(None)
    with pytest.raises(RuntimeError, match="Configure timer client"), compat.expires(after=1):
        pass


def test_compat_module_does_not_import_torch() -> None:
    code = "import sys; import aiotimer.compat.torch; assert 'torch' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
