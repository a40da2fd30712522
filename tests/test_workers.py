"""Real worker processes: spawn, pipe, kill, exit clearing, escalation, stack dumps."""

from __future__ import annotations

import asyncio
import os
import signal
import sys

import pytest
from helpers import WAIT, py, until

from aiotimer import SignalReaper, TimerServer
from aiotimer.testing import RecordingReaper

pytestmark = pytest.mark.slow

# Generous: two shared, noisy cores, and each worker pays a Python start-up.


HANG = """
    import sys, time, aiotimer
    print("ready", flush=True)
    with aiotimer.expires(after=0.2, scope="hang"):
        time.sleep(600)
"""


async def test_hung_worker_is_killed_promptly() -> None:
    async with TimerServer() as server:
        worker = await server.spawn(*py(HANG), stdout=asyncio.subprocess.PIPE)
        assert worker.stdout is not None
        assert await asyncio.wait_for(worker.stdout.readline(), WAIT) == b"ready\n"
        rc = await asyncio.wait_for(worker.wait(), WAIT)
        stats = server.statistics()
    assert rc == -signal.SIGKILL
    assert worker.killed_by_watchdog and worker.expired_scopes == ["hang"]
    assert stats.expiries == 1 and stats.kills == 1


async def test_worker_that_finishes_is_not_killed_and_its_exit_clears_timers() -> None:
    code = """
        import aiotimer, time
        for i in range(200):
            with aiotimer.expires(after=5):
                pass
        aiotimer.get_client().acquire("left armed at exit", time.monotonic() + 0.5)
    """
    async with TimerServer() as server:
        worker = await server.spawn(*py(code))
        assert await asyncio.wait_for(worker.wait(), WAIT) == 0
        await until(lambda: server.statistics().active_timers == 0)
        await asyncio.sleep(0.7)
        stats = server.statistics()
    assert stats.requests == 200 * 2 + 2  # acquires, releases, the hello and the last acquire
    assert stats.expiries == 0 and not worker.killed_by_watchdog


async def test_sigterm_then_sigkill_for_a_worker_that_ignores_sigterm() -> None:
    code = """
        import signal, time, aiotimer
        signal.signal(signal.SIGTERM, lambda *a: print("ignoring SIGTERM", flush=True))
        with aiotimer.expires(after=0.2, scope="stuck"):
            time.sleep(600)
    """
    reaper = SignalReaper(signal.SIGTERM, grace=0.5)
    async with TimerServer(reaper=reaper) as server:
        worker = await server.spawn(*py(code), stdout=asyncio.subprocess.PIPE)
        assert worker.stdout is not None
        out = await asyncio.wait_for(worker.stdout.read(), WAIT)
        rc = await asyncio.wait_for(worker.wait(), WAIT)
    assert b"ignoring SIGTERM" in out
    assert rc == -signal.SIGKILL


async def test_sigterm_alone_suffices_for_a_worker_that_obeys_it() -> None:
    reaper = SignalReaper("TERM", grace=30)
    async with TimerServer(reaper=reaper) as server:
        worker = await server.spawn(*py(HANG))
        assert await asyncio.wait_for(worker.wait(), WAIT) == -signal.SIGTERM


async def test_stacks_are_dumped_before_the_kill() -> None:
    code = """
        import time, aiotimer
        def stuck_in_allreduce():
            with aiotimer.expires(after=0.3, scope="allreduce"):
                time.sleep(600)
        stuck_in_allreduce()
    """
    reaper = SignalReaper(dump_stacks=True, dump_wait=0.5)
    async with TimerServer(reaper=reaper) as server:
        worker = await server.spawn(*py(code), stderr=asyncio.subprocess.PIPE)
        assert worker.stderr is not None
        err = await asyncio.wait_for(worker.stderr.read(), WAIT)
        rc = await asyncio.wait_for(worker.wait(), WAIT)
    assert rc == -signal.SIGKILL
    assert b"stuck_in_allreduce" in err, err.decode(errors="replace")


async def test_malformed_pipe_messages_are_rejected_and_the_rest_honoured(
    caplog: pytest.LogCaptureFixture,
) -> None:
    code = """
        import os, time, aiotimer
        fd = int(os.environ["AIOTIMER_FD"])
        with aiotimer.expires(after=30, scope="fine"):
            os.write(fd, b"\\x00\\x01 this is not a frame \\xff" * 3)
            pass
        os.write(fd, b"more garbage")
        with aiotimer.expires(after=0.2, scope="hang"):
            time.sleep(600)
    """
    async with TimerServer() as server:
        worker = await server.spawn(*py(code))
        rc = await asyncio.wait_for(worker.wait(), WAIT)
        stats = server.statistics()
    assert rc == -signal.SIGKILL and worker.expired_scopes == ["hang"]
    assert stats.rejected >= 1
    assert "bytes that are not frames" in caplog.text


async def test_child_processes_are_keyed_by_their_own_pid() -> None:
    # Parent and forked child use the same scope; the child hangs. Only the child dies.
    code = """
        import os, sys, time, aiotimer
        with aiotimer.expires(after=30, scope="same"):
            pid = os.fork()
            if pid == 0:
                with aiotimer.expires(after=0.2, scope="same"):
                    time.sleep(600)
                os._exit(0)
            _, status = os.waitpid(pid, 0)
        print("child status", os.waitstatus_to_exitcode(status), flush=True)
    """
    async with TimerServer() as server:
        worker = await server.spawn(*py(code), stdout=asyncio.subprocess.PIPE)
        assert worker.stdout is not None
        out = await asyncio.wait_for(worker.stdout.read(), WAIT)
        rc = await asyncio.wait_for(worker.wait(), WAIT)
    assert rc == 0
    assert out.strip() == f"child status {-signal.SIGKILL}".encode()
    assert not worker.killed_by_watchdog


async def test_process_group_kill_takes_the_workers_children_too() -> None:
    code = """
        import subprocess, sys, time, aiotimer
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        print(child.pid, flush=True)
        with aiotimer.expires(after=0.3, scope="hang"):
            time.sleep(600)
    """
    async with TimerServer(reaper=SignalReaper(process_group=True)) as server:
        worker = await server.spawn(*py(code), process_group=True, stdout=asyncio.subprocess.PIPE)
        assert worker.stdout is not None
        child_pid = int(await asyncio.wait_for(worker.stdout.readline(), WAIT))
        assert await asyncio.wait_for(worker.wait(), WAIT) == -signal.SIGKILL
    # The grandchild was in the group: it is gone (or a zombie awaiting init).
    for _ in range(500):
        try:
            with open(f"/proc/{child_pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    break
        except FileNotFoundError:
            break
        await asyncio.sleep(0.01)
    else:
        os.kill(child_pid, signal.SIGKILL)
        raise AssertionError("the worker's child survived a process-group kill")


async def test_a_worker_specific_reaper_overrides_the_servers() -> None:
    reaper = RecordingReaper()
    async with TimerServer() as server:
        worker = await server.spawn(*py(HANG), reaper=reaper)
        await until(lambda: bool(reaper.expiries))
        assert reaper.scopes == [["hang"]] and worker.returncode is None
    # aclose() kills and reaps what is still running.
    assert worker.returncode == -signal.SIGKILL


async def test_async_timer_with_soft_timeout_in_a_worker() -> None:
    code = """
        import asyncio, aiotimer
        async def main():
            try:
                async with aiotimer.timer(after=30, scope="fetch", soft_timeout=0.2):
                    await asyncio.sleep(600)
            except TimeoutError:
                print("soft timeout", flush=True)
        asyncio.run(main())
    """
    async with TimerServer() as server:
        worker = await server.spawn(*py(code), stdout=asyncio.subprocess.PIPE)
        assert worker.stdout is not None
        out = await asyncio.wait_for(worker.stdout.read(), WAIT)
        assert await asyncio.wait_for(worker.wait(), WAIT) == 0
        assert server.statistics().active_timers == 0
    assert out == b"soft timeout\n"


async def test_client_raises_broken_pipe_when_the_server_is_gone() -> None:
    code = """
        import sys, time, aiotimer
        sys.stdin.readline()  # wait until the server has closed our pipe
        try:
            with aiotimer.expires(after=5):
                pass
        except BrokenPipeError as exc:
            print(type(exc).__name__, flush=True)
    """
    async with TimerServer() as server:
        worker = await server.spawn(
            *py(code), stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE
        )
        for channel in list(server._transports.channels.values()):
            channel.close()
        assert worker.stdin is not None and worker.stdout is not None
        worker.stdin.write(b"go\n")
        await worker.stdin.drain()
        out = await asyncio.wait_for(worker.stdout.read(), WAIT)
        assert await asyncio.wait_for(worker.wait(), WAIT) == 0
    assert out == b"ServerUnavailableError\n"


async def test_pidfd_child_watcher_reaps_children_without_a_thread_each() -> None:
    import threading
    import warnings

    from aiotimer._loops import pidfd_child_watcher

    def waitpid_threads() -> int:
        return sum("waitpid-" in t.name for t in threading.enumerate())

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # child watchers, on 3.12+
        before = asyncio.get_child_watcher() if sys.version_info < (3, 12) else None
    threads = waitpid_threads()
    async with pidfd_child_watcher(), TimerServer() as server:
        worker = await server.spawn(sys.executable, "-c", "import time; time.sleep(600)")
        assert waitpid_threads() == threads  # while it runs, no thread waits for it
        worker.kill()
        assert await asyncio.wait_for(worker.wait(), 60) == -signal.SIGKILL
    if before is not None:
        assert asyncio.get_child_watcher() is before  # restored for the rest of the process


async def test_every_worker_exit_is_reported_exactly_once_over_many_runs() -> None:
    """On Python 3.11's own loop a watcher thread may reap a worker before its pidfd is
    seen; its WorkerExited still comes, once, with its status, before the server closes."""
    from aiotimer import WorkerExited

    for _ in range(10):
        seen: list[WorkerExited] = []

        def record(event: object, seen: list[WorkerExited] = seen) -> None:
            if isinstance(event, WorkerExited):
                seen.append(event)

        async with TimerServer() as server:
            server.events.subscribe(record)
            workers = [
                await server.spawn(sys.executable, "-c", f"raise SystemExit({code})")
                for code in (0, 3, 7)
            ]
            statuses = [await asyncio.wait_for(w.wait(), WAIT) for w in workers]
        assert statuses == [0, 3, 7]
        assert sorted((e.pid, e.returncode) for e in seen) == sorted(
            (w.pid, s) for w, s in zip(workers, statuses, strict=True)
        )


async def test_a_worker_inherits_stdio_unless_asked_for_pipes() -> None:
    """As asyncio.create_subprocess_exec: no pipes (and no fds left behind) by default."""
    async with TimerServer() as server:
        worker = await server.spawn(sys.executable, "-c", "pass")
        assert (worker.stdin, worker.stdout, worker.stderr) == (None, None, None)
        assert await asyncio.wait_for(worker.wait(), WAIT) == 0
        piped = await server.spawn(
            sys.executable, "-c", "print('hi')", stdout=asyncio.subprocess.PIPE
        )
        assert piped.stdout is not None and piped.stdin is None
        assert await asyncio.wait_for(piped.stdout.read(), WAIT) == b"hi\n"
        assert await asyncio.wait_for(piped.wait(), WAIT) == 0


async def test_closing_waits_until_asyncio_has_reaped_every_worker(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The pidfd can report a worker's exit (its status read with WNOWAIT) before asyncio's
    child watcher has reaped it: on Python 3.11's own loop that watcher is a thread per
    child, which a busy machine runs late.  Closing the server must wait for the watcher.
    Otherwise the loop closes with the worker's subprocess transport still "running", and
    whichever later test collects it fails on the ResourceWarning ("subprocess N is still
    running"): the flaky uvloop variant of the adversarial channel test (issue 23, item 1)."""
    import threading
    import time

    real_waitpid = os.waitpid

    def late_waitpid(pid: int, options: int) -> tuple[int, int]:
        if threading.current_thread().name.startswith("asyncio-waitpid"):
            os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)  # until it exits, not reaped
            time.sleep(0.3)  # the watcher thread gets a CPU late, as on two busy cores
        return real_waitpid(pid, options)

    monkeypatch.setattr(os, "waitpid", late_waitpid)
    async with TimerServer() as server:
        worker = await server.spawn(*py(HANG), stdout=asyncio.subprocess.PIPE)
        assert worker.stdout is not None
        assert await asyncio.wait_for(worker.stdout.readline(), WAIT) == b"ready\n"
        assert await asyncio.wait_for(worker.wait(), WAIT) == -signal.SIGKILL
    # asyncio's own view of the process (its transport's return code): reaped, not running.
    seen = worker.returncode
    await asyncio.wait_for(worker.exit_status(), WAIT)  # leave nothing for a later test
    assert seen == -signal.SIGKILL
