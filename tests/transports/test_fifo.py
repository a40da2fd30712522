"""The FIFO transport (torch's wire format) on every loop, without torch."""

from __future__ import annotations

import asyncio
import logging
import os
import resource
import signal
import stat
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import until

from aiotimer import TimerServer
from aiotimer._protocol import encode_json_request
from aiotimer.testing import MockClock, RecordingReaper
from aiotimer.transports import _paths as paths_module
from aiotimer.transports import listen_fifo


def write(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


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


async def test_another_users_fifo_is_refused_not_replaced(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to make a FIFO of another user")
    theirs = tmp_path / "f"
    os.mkfifo(theirs)
    os.chown(theirs, 65534, 65534)
    async with TimerServer() as server:
        with pytest.raises(FileExistsError, match=r"is a FIFO of another user \(uid 65534\)"):
            await listen_fifo(server, theirs)
    assert os.lstat(theirs).st_uid == 65534


# -- the path stays ours while serving ------------------------------------------------

#: A torch FileTimerClient's request, then a hang: it must be killed.
_HUNG_TORCH_CLIENT = textwrap.dedent("""
    import os, sys, time
    from aiotimer._protocol import encode_json_request
    fd = os.open(sys.argv[1], os.O_WRONLY | os.O_NONBLOCK)
    os.write(fd, encode_json_request(os.getpid(), "after", time.time() + 0.3, 9))
    os.close(fd)
    time.sleep(600)
""")


def take_the_path(fifo: Path, kind: str) -> Path | None:
    """Put ``kind`` where the FIFO is, as another program would; the symlink's target."""
    new = fifo.with_name("new")
    target = None
    if kind == "directory":
        fifo.unlink()  # a directory cannot be renamed over a FIFO
        fifo.mkdir()
        (fifo / "inside").write_text("theirs")
        return None
    if kind == "regular file":
        new.write_text("theirs")
    elif kind == "symlink":
        target = fifo.with_name("target")
        target.write_text("precious")
        new.symlink_to(target)
    else:
        os.mkfifo(new, 0o666)
    os.rename(new, fifo)  # atomically: the FIFO's name never missing
    return target


def fifo_warnings(caplog: pytest.LogCaptureFixture, fifo: Path) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name.startswith("aiotimer")
        and r.levelno >= logging.WARNING
        and str(fifo) in r.getMessage()
    ]


def is_our_fifo(path: Path) -> bool:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    return stat.S_ISFIFO(st.st_mode) and st.st_uid == os.geteuid()


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["regular file", "symlink", "directory", "FIFO"])
async def test_whatever_takes_the_fifos_place_is_moved_aside_and_the_next_client_served(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, kind: str
) -> None:
    """A FIFO replaced by a file once left torch clients writing into it, hangs unkilled;
    replaced by a symlink, writing their requests where it pointed."""
    caplog.set_level(logging.WARNING, logger="aiotimer")
    fifo = tmp_path / "timer.fifo"
    async with TimerServer() as server:
        listener = await listen_fifo(server, fifo)
        ours = os.lstat(fifo).st_ino
        target = take_the_path(fifo, kind)
        await until(lambda: listener.replaced == 1)
        assert is_our_fifo(fifo) and os.lstat(fifo).st_ino != ours
        assert stat.S_IMODE(os.lstat(fifo).st_mode) == 0o600
        client = await asyncio.create_subprocess_exec(
            sys.executable, "-c", _HUNG_TORCH_CLIENT, str(fifo)
        )
        try:
            assert await asyncio.wait_for(client.wait(), 60) == -signal.SIGKILL
        finally:
            if client.returncode is None:
                client.kill()
                await client.wait()
        assert server.statistics().kills == 1
        assert listener.replaced == listener.displaced == 1
    aside = tmp_path / "timer.fifo.displaced-1"
    st = os.lstat(aside)
    if kind == "regular file":
        assert stat.S_ISREG(st.st_mode) and aside.read_text() == "theirs"
    elif kind == "symlink":
        assert stat.S_ISLNK(st.st_mode) and os.readlink(aside) == str(target)
        assert target is not None and target.read_text() == "precious"
    elif kind == "directory":
        assert stat.S_ISDIR(st.st_mode) and (aside / "inside").read_text() == "theirs"
    else:
        assert stat.S_ISFIFO(st.st_mode) and st.st_ino != ours
    assert not fifo.exists()  # ours was removed on close; theirs stays
    [warning] = fifo_warnings(caplog, fifo)
    what = "another FIFO" if kind == "FIFO" else kind
    assert what in warning and "moved it aside to" in warning, warning


async def test_a_name_taken_is_skipped_and_what_cannot_be_renamed_is_removed(
    tmp_path: Path,
    mock_clock: MockClock,
    sleeper: Callable[[], subprocess.Popen[bytes]],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="aiotimer")
    pid = sleeper().pid
    fifo = tmp_path / "timer.fifo"
    planted = tmp_path / "timer.fifo.displaced-1"
    planted.write_text("left by an earlier server")
    reaper = RecordingReaper()
    async with TimerServer(clock=mock_clock, reaper=reaper) as server:
        listener = await listen_fifo(server, fifo)
        listener.warn_period = 1.0
        take_the_path(fifo, "regular file")
        await until(lambda: listener.replaced == 1)
        assert (tmp_path / "timer.fifo.displaced-2").read_text() == "theirs"
        assert planted.read_text() == "left by an earlier server"

        def refuse(src: str, dst: str) -> None:
            raise PermissionError(1, "Operation not permitted", src)

        # Where it cannot be renamed, a file or symlink is removed (never followed).
        monkeypatch.setattr(paths_module, "rename_noreplace", refuse)
        target = take_the_path(fifo, "symlink")
        await until(lambda: listener.replaced == 2)
        assert is_our_fifo(fifo) and listener.displaced == 2
        assert target is not None and target.read_text() == "precious"
        assert sorted(p.name for p in tmp_path.iterdir()) == [
            "target",
            "timer.fifo",
            "timer.fifo.displaced-1",
            "timer.fifo.displaced-2",
        ]
        # ... but a directory is someone's: left in place, and said.
        take_the_path(fifo, "directory")
        await until(lambda: listener.replaced == 3)
        assert (fifo / "inside").read_text() == "theirs"
        # The second and third warnings came within warn_period of the first: summed up.
        assert len(fifo_warnings(caplog, fifo)) == 1
        await until(lambda: len(fifo_warnings(caplog, fifo)) == 2)
        summary = fifo_warnings(caplog, fifo)[1]
        assert "2 more time" in summary and "cannot be moved aside or removed" in summary
        # The directory goes: the FIFO is made again and serves.
        monkeypatch.undo()
        (fifo / "inside").unlink()
        fifo.rmdir()
        await until(lambda: is_our_fifo(fifo))
        write(fifo, encode_json_request(pid, "after", mock_clock.wall() + 0.3, 9))
        await until(lambda: server.statistics().active_timers == 1)
        await mock_clock.advance(0.3)
        assert reaper.scopes == [["after"]]


@pytest.mark.slow
async def test_a_writer_of_deeply_nested_lines_loses_nobody_elses_request(tmp_path: Path) -> None:
    """One writer sending '[' * 3000 lines every 0.5 ms once made every read raise: releases
    were lost (false kills) and acquires too (hangs unkilled), with a traceback per read."""
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
