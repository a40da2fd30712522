"""The FIFO transport (torch's wire format) on every loop, without torch."""

from __future__ import annotations

import asyncio
import os
import resource
import stat
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from aiotimer import TimerServer
from aiotimer._protocol import encode_json_request
from aiotimer.testing import MockClock, RecordingReaper
from aiotimer.transports import listen_fifo


def write(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


async def until(predicate: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)


async def test_lines_are_reassembled_bad_ones_rejected_and_the_rest_kept(
    tmp_path: Path,
    mock_clock: MockClock,
    sleeper: Callable[[], subprocess.Popen[bytes]],
) -> None:
    pid = sleeper().pid
    fifo = tmp_path / "f"
    reaper = RecordingReaper()
    async with TimerServer(clock=mock_clock, reaper=reaper) as server:
        await listen_fifo(server, fifo)
        assert stat.S_ISFIFO(os.stat(fifo).st_mode)
        assert stat.S_IMODE(os.stat(fifo).st_mode) == 0o600
        wall = mock_clock.wall()
        line = encode_json_request(pid, "a", wall + 5, 9)
        write(fifo, line[:10])  # a line split across two writes
        write(fifo, line[10:] + b"{oops\n" + b"x" * 5000 + b"\n")
        write(
            fifo, encode_json_request(pid, "b", wall + 7, 9) + encode_json_request(pid, "b", -1, 0)
        )
        await until(lambda: server.statistics().requests == 3)
        stats = server.statistics()
        assert stats.rejected == 2 and stats.active_timers == 1
        await mock_clock.advance(5.0)
        assert reaper.scopes == [["a"]]
        assert reaper.expiries[0].requested_signal == 9
    assert not fifo.exists()


async def test_a_request_after_a_partial_junk_line_is_not_lost(
    tmp_path: Path,
    mock_clock: MockClock,
    sleeper: Callable[[], subprocess.Popen[bytes]],
) -> None:
    # Junk that does not end its line (short, or longer than a request line may
    # be) must not swallow the next client's request: its hang would go unkilled.
    pid = sleeper().pid
    fifo = tmp_path / "f"
    reaper = RecordingReaper()
    async with TimerServer(clock=mock_clock, reaper=reaper) as server:
        await listen_fifo(server, fifo)
        wall = mock_clock.wall()
        write(fifo, b'{"not": ')
        write(fifo, encode_json_request(pid, "a", wall + 5, 9))
        write(fifo, b"x" * 9000)
        write(fifo, encode_json_request(pid, "b", wall + 6, 9))
        await until(lambda: server.statistics().requests == 2)
        assert server.statistics().rejected == 2
        await mock_clock.advance(6.0)
        assert sorted(s for scopes in reaper.scopes for s in scopes) == ["a", "b"]


async def test_the_server_itself_and_foreign_pids_are_refused(
    tmp_path: Path, mock_clock: MockClock
) -> None:
    fifo = tmp_path / "f"
    async with TimerServer(clock=mock_clock, reaper=RecordingReaper()) as server:
        await listen_fifo(server, fifo)
        for pid in (os.getpid(), 1, os.getppid()):
            write(fifo, encode_json_request(pid, "evil", mock_clock.wall() + 1, 9))
        await until(lambda: server.statistics().rejected == 3)
        assert server.statistics().active_timers == 0


async def test_clients_closing_do_not_make_the_reader_spin(tmp_path: Path) -> None:
    fifo = tmp_path / "f"
    async with TimerServer() as server:
        await listen_fifo(server, fifo)
        write(fifo, b"\n")  # a client opens, writes and closes
        await asyncio.sleep(0.05)
        usage = resource.getrusage(resource.RUSAGE_SELF)
        cpu0 = usage.ru_utime + usage.ru_stime
        await asyncio.sleep(0.5)
        usage = resource.getrusage(resource.RUSAGE_SELF)
        assert usage.ru_utime + usage.ru_stime - cpu0 < 0.25  # a spinning reader burns ~0.5 s


async def test_a_path_that_is_not_a_fifo_is_refused(tmp_path: Path) -> None:
    precious = tmp_path / "precious"
    precious.write_text("data")
    async with TimerServer() as server:
        with pytest.raises(FileExistsError, match="exists and is not a FIFO"):
            await listen_fifo(server, precious)
    assert precious.read_text() == "data"


async def test_a_stale_fifo_is_replaced(tmp_path: Path) -> None:
    fifo = tmp_path / "f"
    os.mkfifo(fifo)
    async with TimerServer() as server:
        await listen_fifo(server, fifo)
        write(fifo, b"\n")
    assert not fifo.exists()


@pytest.mark.slow
async def test_a_writer_of_deeply_nested_lines_loses_nobody_elses_request(tmp_path: Path) -> None:
    """One writer sending '[' * 3000 lines every 0.5 ms once made every read raise: releases
    were lost (false kills) and acquires too (hangs unkilled), with a traceback per read."""
    import signal
    import sys
    import textwrap

    fifo = tmp_path / "f"
    client = textwrap.dedent("""
        import os, sys, time
        from aiotimer._protocol import encode_json_request
        fifo, mode = sys.argv[1], sys.argv[2]
        def send(line):
            fd = os.open(fifo, os.O_WRONLY)
            os.write(fd, line)
            os.close(fd)
        me = os.getpid()
        end = time.monotonic() + 2.0
        if mode == "poison":
            while time.monotonic() < end:
                send(b"[" * 3000 + b"\\n")
                time.sleep(0.0005)
        elif mode == "good":
            while time.monotonic() < end:
                send(encode_json_request(me, "step", time.time() + 0.5, 9))
                time.sleep(0.01)
                send(encode_json_request(me, "step", -1, 0))
        else:
            send(encode_json_request(me, "hang", time.time() + 0.5, 9))
            time.sleep(600)
    """)
    async with TimerServer() as server:
        await listen_fifo(server, fifo)

        async def start(mode: str) -> asyncio.subprocess.Process:
            return await asyncio.create_subprocess_exec(
                sys.executable, "-c", client, str(fifo), mode
            )

        poison = await start("poison")
        good = [await start("good") for _ in range(3)]
        hung = [await start("hang") for _ in range(3)]
        try:
            assert [await asyncio.wait_for(p.wait(), 60) for p in good] == [0, 0, 0]
            assert [await asyncio.wait_for(p.wait(), 60) for p in hung] == [-signal.SIGKILL] * 3
            assert await asyncio.wait_for(poison.wait(), 60) == 0
        finally:
            for p in (poison, *good, *hung):
                if p.returncode is None:
                    p.kill()
                    await p.wait()
        assert server.statistics().rejected > 0
