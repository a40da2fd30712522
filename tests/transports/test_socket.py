"""The socket transport with real processes, on every loop: who may arm, paths, hostile peers."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from helpers import until

from aiotimer import TimerServer
from aiotimer._protocol import encode_hello, encode_release
from aiotimer.transports import listen_socket
from aiotimer.transports.socket import SocketListener

pytestmark = pytest.mark.slow

#: A client that arms a timer over the socket and hangs in it: it must be killed.
HANG = textwrap.dedent("""
    import sys, time, aiotimer
    with aiotimer.expires(after=float(sys.argv[1]), scope="hang"):
        print("armed", flush=True)
        time.sleep(600)
""")

#: A client that tries to arm a timer: prints how it was refused, and exits 3.
TRY = textwrap.dedent("""
    import sys, time, aiotimer
    try:
        with aiotimer.expires(after=60, scope="try"):
            pass
    except aiotimer.NotEntitledError as exc:
        assert isinstance(exc, PermissionError)
        print("refused:", exc, flush=True)
        sys.exit(3)
    print("armed and released", flush=True)
""")


#: As TRY, three times 0.6 s apart: the second is answered by the client itself (a refusal
#: is held for a second), the third asks the server again.
RETRY = textwrap.dedent("""
    import sys, time, aiotimer
    for attempt in range(3):
        try:
            with aiotimer.expires(after=60, scope="try"):
                pass
        except aiotimer.NotEntitledError as exc:
            print("refused:", exc, flush=True)
        time.sleep(0.6)
    sys.exit(3)
""")


def client_env(path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIOTIMER_")}
    env["AIOTIMER_SOCKET"] = str(path)
    return env


async def run_client(
    code: str, path: Path, *args: str, prefix: tuple[str, ...] = (), timeout: float = 60
) -> tuple[int, str]:
    """Run ``code`` as a client of the socket at ``path``: its exit status and output."""
    proc = await asyncio.create_subprocess_exec(
        *prefix,
        sys.executable,
        "-c",
        code,
        *args,
        env=client_env(path),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, out.decode()


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name.startswith("aiotimer") and r.levelno >= logging.WARNING
    ]


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory other users can reach (pytest's tmp_path is 0700 root's)."""
    base = Path(tempfile.mkdtemp(prefix="aiotimer-test-"))
    base.chmod(0o755)
    yield base
    shutil.rmtree(base, ignore_errors=True)


# -- who may arm ---------------------------------------------------------------------------


async def test_a_same_uid_child_arms_and_is_killed_when_it_hangs(tmp_path: Path) -> None:
    path = tmp_path / "run" / "timer.sock"
    async with TimerServer() as server:
        listener = await listen_socket(server, path)
        assert stat.S_IMODE(os.lstat(path.parent).st_mode) == 0o700
        assert stat.S_IMODE(os.lstat(path).st_mode) == 0o600
        assert stat.S_ISSOCK(os.lstat(path).st_mode)
        status, out = await run_client(HANG, path, "0.3")
        assert status == -signal.SIGKILL, out
        assert "armed" in out
        stats = server.statistics()
        assert stats.kills == 1 and stats.rejected == 0
        assert listener.accepted == 1 and listener.refused == 0
        # Its requests came through the pipe it handed over (bytes on the connection
        # after that would have been rejected).
        assert listener.piped == 1
    assert not path.exists() and not path.parent.exists()  # the directory it made goes too


async def test_a_process_that_releases_in_time_is_not_killed(tmp_path: Path) -> None:
    code = textwrap.dedent("""
        import asyncio, time, aiotimer
        async def main():
            for _ in range(50):
                async with aiotimer.timer(after=5, scope="step"):
                    await asyncio.sleep(0)
                with aiotimer.expires(after=5):
                    pass
        asyncio.run(main())
        print("done", flush=True)
    """)
    path = tmp_path / "timer.sock"
    async with TimerServer() as server:
        listener = await listen_socket(server, path)
        status, out = await run_client(code, path)
        assert status == 0 and "done" in out, out
        await until(lambda: server.statistics().requests >= 201)  # a greeting and 200 requests
        stats = server.statistics()
        assert stats.active_timers == 0 and stats.kills == 0 and stats.rejected == 0, stats
        assert listener.accepted == 1 and listener.piped == 1
        await until(lambda: listener.connections == 0)


async def test_processes_that_exit_right_after_a_block_cost_no_rejection(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A release read after its process's exit was seen is moot, not a rejection to log."""
    caplog.set_level(logging.WARNING, logger="aiotimer")
    code = "import aiotimer\nwith aiotimer.expires(after=60):\n    pass\n"
    path = tmp_path / "timer.sock"
    async with TimerServer() as server:
        listener = await listen_socket(server, path)
        procs = [
            await asyncio.create_subprocess_exec(sys.executable, "-c", code, env=client_env(path))
            for _ in range(10)
        ]
        assert [await asyncio.wait_for(p.wait(), 60) for p in procs] == [0] * 10
        await until(lambda: listener.accepted == 10 and listener.connections == 0)
        await until(lambda: server.statistics().watched_processes == 0)
        stats = server.statistics()
        assert stats.rejected == 0 and stats.active_timers == 0 and stats.kills == 0, stats
    assert warnings_of(caplog) == []


def _reachable_by_others(path: Path) -> bool:
    """Whether another user can reach ``path`` (every directory above it searchable by all)."""
    return all(p.stat().st_mode & 0o001 for p in path.resolve().parents)


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"), reason="needs root")
async def test_another_user_cannot_arm_anything_and_is_told_why(
    shared_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import aiotimer

    package = Path(aiotimer.__file__)
    if not _reachable_by_others(package):
        # A checkout in a 0700 directory (mktemp -d): uid 65534 cannot import aiotimer.
        pytest.skip(f"{package} is not reachable by another user, who must run the client")
    caplog.set_level(logging.WARNING, logger="aiotimer")
    nobody = ("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups")
    path = shared_dir / "run" / "timer.sock"
    async with TimerServer() as server:
        listener = await listen_socket(server, path)
        # As made: the directory is 0700, the socket cannot even be reached.
        status, out = await run_client(TRY, path, prefix=nobody)
        assert status == 3, out
        assert "refused:" in out and "only the server's user may arm timers" in out
        # Opened up by mistake: the kernel still names the peer's uid, and the server says no.
        path.parent.chmod(0o755)
        path.chmod(0o666)
        for _ in range(2):
            status, out = await run_client(TRY, path, prefix=nobody)
            assert status == 3, out
            assert "refused this process" in out and "runs as uid 65534" in out, out
        assert listener.refused == 2 and listener.accepted == 0
        stats = server.statistics()
        assert stats.active_timers == 0 and stats.watched_processes == 0
        assert stats.rejected == 2
    refusals = [w for w in warnings_of(caplog) if "refused a connection" in w]
    assert len(refusals) == 2, refusals  # two processes: one line each


async def test_a_same_user_process_not_descending_from_the_server_is_refused(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A server in another process: this test's client is its sibling, not its descendant."""
    caplog.set_level(logging.WARNING, logger="aiotimer")
    path = tmp_path / "timer.sock"
    server_code = textwrap.dedent("""
        import asyncio, logging, sys
        import aiotimer
        from aiotimer.transports import listen_socket
        logging.basicConfig(level=logging.WARNING, format="LOG %(message)s")
        async def main():
            async with aiotimer.TimerServer() as server:
                listener = await listen_socket(server, sys.argv[1])
                print("ready", flush=True)
                await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
                print("REFUSED", listener.refused, "rejected", server.statistics().rejected,
                      "timers", server.statistics().active_timers, flush=True)
        asyncio.run(main())
    """)
    server = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        server_code,
        str(path),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    assert server.stdin is not None and server.stdout is not None
    try:
        assert await asyncio.wait_for(server.stdout.readline(), 60) == b"ready\n"
        for code in (TRY, RETRY):
            status, out = await run_client(code, path)
            assert status == 3, out
            assert "does not descend from the server" in out, out
        server.stdin.close()
        out = (await asyncio.wait_for(server.stdout.read(), 60)).decode()
    finally:
        if server.returncode is None:
            server.kill()
        await server.wait()
    # Each refusal counted (the retry within a second was answered by the client itself);
    # one log line per process.
    assert "timers 0" in out, out
    refused = int(out.split("REFUSED ")[1].split()[0])
    assert 3 <= refused <= 4, out
    assert out.count("LOG rejected a request") == 2, out


# -- one connection per process: fork, multiprocessing ---------------------------------------

FAMILY = textwrap.dedent("""
    import multiprocessing, os, sys, time
    import aiotimer

    def hang(tag):
        with aiotimer.expires(after=0.5, scope=tag):
            time.sleep(600)

    if __name__ == "__main__":
        with aiotimer.expires(after=60, scope="parent"):
            pid = os.fork()
            if pid == 0:
                hang("forked")
                os._exit(0)
            _, status = os.waitpid(pid, 0)
            print("forked", os.waitstatus_to_exitcode(status), flush=True)
        codes = []
        for method in ("spawn", "forkserver", "fork"):
            ctx = multiprocessing.get_context(method)
            worker = ctx.Process(target=hang, args=(method,))
            worker.start()
            worker.join(60)
            codes.append(worker.exitcode)
        print("workers", *codes, flush=True)
        with aiotimer.expires(after=60, scope="parent again"):  # still the parent's own
            pass
        print("parent done", flush=True)
""")


async def test_a_forked_child_and_multiprocessing_workers_arm_their_own_timers(
    tmp_path: Path,
) -> None:
    script = tmp_path / "family.py"
    script.write_text(FAMILY)
    path = tmp_path / "timer.sock"
    async with TimerServer() as server:
        listener = await listen_socket(server, path)
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            str(script),
            env=client_env(path),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        out = (await asyncio.wait_for(proc.communicate(), 120))[0].decode()
        assert proc.returncode == 0, out
        assert "forked -9" in out and "workers -9 -9 -9" in out and "parent done" in out, out
        stats = server.statistics()
        assert stats.kills == 4 and stats.rejected == 0, stats
        # The parent, its forked child and the three workers: a connection and a pipe each.
        assert listener.accepted == 5 and listener.piped == 5


# -- a restarted server ---------------------------------------------------------------------


async def test_a_client_connects_once_more_to_a_restarted_server(tmp_path: Path) -> None:
    code = textwrap.dedent("""
        import sys, aiotimer
        def block(tag):
            with aiotimer.expires(after=60, scope=tag):
                pass
        block("first")
        print("first", flush=True)
        sys.stdin.readline()
        try:
            block("second")
        except aiotimer.ServerUnavailableError as exc:
            print("unavailable:", exc, flush=True)
            sys.exit(4)
        print("second", flush=True)
    """)
    path = tmp_path / "timer.sock"

    async def client() -> asyncio.subprocess.Process:
        return await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            code,
            env=client_env(path),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )

    procs: list[asyncio.subprocess.Process] = []
    try:
        async with TimerServer() as server:
            await listen_socket(server, path)
            # Started once the socket is there: a client that came first would be told
            # that no server listens (CI once started them before it was).
            restarted, gone = procs[:] = [await client(), await client()]
            for proc in (restarted, gone):
                assert proc.stdout is not None
                assert await asyncio.wait_for(proc.stdout.readline(), 60) == b"first\n"
        # Without a server: the one who asks now is told so.
        assert gone.stdin is not None
        gone.stdin.write(b"\n")
        out = (await asyncio.wait_for(gone.communicate(), 60))[0].decode()
        assert gone.returncode == 4 and "no timer server listens on" in out, out
        async with TimerServer() as server:
            listener = await listen_socket(server, path)
            assert restarted.stdin is not None
            restarted.stdin.write(b"\n")
            out = (await asyncio.wait_for(restarted.communicate(), 60))[0].decode()
            assert restarted.returncode == 0 and "second" in out, out
            assert listener.accepted == 1 and listener.piped == 1
            await until(lambda: server.statistics().requests >= 3)  # hello, acquire, release
            assert server.statistics().rejected == 0
    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()


# -- the path ---------------------------------------------------------------------------------


async def test_a_symlink_at_the_path_is_refused_and_never_followed(tmp_path: Path) -> None:
    target = tmp_path / "target"
    target.write_text("precious")
    path = tmp_path / "timer.sock"
    path.symlink_to(target)
    async with TimerServer() as server:
        with pytest.raises(FileExistsError, match="exists and is not a socket"):
            await listen_socket(server, path)
    assert path.is_symlink() and target.read_text() == "precious"


async def test_a_file_or_directory_at_the_path_is_refused(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("data")
    (tmp_path / "dir").mkdir()
    async with TimerServer() as server:
        for name in ("file", "dir"):
            with pytest.raises(FileExistsError, match="exists and is not a socket"):
                await listen_socket(server, tmp_path / name)
    assert (tmp_path / "file").read_text() == "data" and (tmp_path / "dir").is_dir()


async def test_a_symlinked_or_shared_directory_is_refused(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    (tmp_path / "link").symlink_to(real)
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    async with TimerServer() as server:
        with pytest.raises(FileExistsError, match="is not a directory"):
            await listen_socket(server, tmp_path / "link" / "timer.sock")
        with pytest.raises(FileExistsError, match="writable by others"):
            await listen_socket(server, shared / "timer.sock")
        with pytest.raises(ValueError, match=r"`path` .* longer than a Unix socket path"):
            await listen_socket(server, tmp_path / ("x" * 120))
    assert list(real.iterdir()) == [] and list(shared.iterdir()) == []


async def test_a_stale_socket_is_replaced_and_a_live_one_refused(tmp_path: Path) -> None:
    path = tmp_path / "timer.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()  # a server that exited without removing it
    async with TimerServer() as server:
        await listen_socket(server, path)
        status, out = await run_client(HANG, path, "0.2")
        assert status == -signal.SIGKILL, out
        async with TimerServer() as other:  # a second job on the same path
            with pytest.raises(FileExistsError, match="a socket a server is listening on"):
                await listen_socket(other, path)
        assert stat.S_ISSOCK(os.lstat(path).st_mode)
    assert not path.exists()


def take_the_path(path: Path, kind: str) -> None:
    """Put ``kind`` where the socket is, as another program would."""
    new = path.with_name("new")
    if kind == "removed":
        path.unlink()
        return
    if kind == "regular file":
        new.write_text("theirs")
    elif kind == "symlink":
        new.symlink_to(path.with_name("target"))
    else:
        theirs = socket.socket(socket.AF_UNIX)
        theirs.bind(str(new))
        theirs.listen()
        theirs.detach()  # left listening (closed when the test process exits)
    os.rename(new, path)


@pytest.mark.parametrize("kind", ["removed", "regular file", "symlink", "socket"])
async def test_a_socket_removed_or_replaced_while_serving_is_made_again(
    tmp_path: Path, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="aiotimer")
    path = tmp_path / "timer.sock"
    async with TimerServer() as server:
        listener = await listen_socket(server, path)
        ours = os.lstat(path).st_ino
        take_the_path(path, kind)
        await until(lambda: listener.replaced == 1)
        st = os.lstat(path)
        assert stat.S_ISSOCK(st.st_mode) and st.st_ino != ours
        assert stat.S_IMODE(st.st_mode) == 0o600
        status, out = await run_client(HANG, path, "0.2")
        assert status == -signal.SIGKILL, out
        assert listener.displaced == (0 if kind == "removed" else 1)
    if kind != "removed":
        aside = os.lstat(tmp_path / "timer.sock.displaced-1")
        assert not stat.S_ISSOCK(aside.st_mode) or kind == "socket"
    [warning] = [w for w in warnings_of(caplog) if str(path) in w]
    assert "created the socket again" in warning, warning


# -- hostile peers ---------------------------------------------------------------------------

HOSTILE = textwrap.dedent("""
    import os, random, socket, sys, time
    from aiotimer._protocol import encode_acquire_stamped
    path, mode = sys.argv[1], sys.argv[2]
    held = []
    def connect():
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(path)
        return s
    rng = random.Random(7)
    if mode == "connects":
        for _ in range(1000):
            try:
                held.append(connect())  # never read: the server's answers just sit there
            except OSError:
                pass
            if len(held) > 32:
                held.pop(0).close()
    else:
        for _ in range(200):
            s = connect()
            try:  # refused when over the per-process cap: the server closed it
                if mode == "garbage":
                    s.sendall(bytes(rng.getrandbits(8) for _ in range(rng.randrange(1, 4096))))
                else:  # half frames
                    frame = encode_acquire_stamped(os.getpid(), "x" * 64, 1.0, 0.0)
                    s.sendall(frame[: rng.randrange(1, len(frame))])
            except OSError:
                pass
            held.append(s)
            if len(held) > 3:
                held.pop(0).close()
    print("done", flush=True)
    time.sleep(600)
""")


async def test_hostile_peers_cost_bounded_log_lines_and_a_bystander_is_still_killed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="aiotimer")
    path = tmp_path / "timer.sock"
    async with TimerServer() as server:
        listener = await listen_socket(server, path)
        hostile = [
            await asyncio.create_subprocess_exec(
                sys.executable,
                "-c",
                HOSTILE,
                str(path),
                mode,
                env=client_env(path),
                stdout=asyncio.subprocess.PIPE,
            )
            for mode in ("connects", "garbage", "half")
        ]
        try:
            bystander_started = time.monotonic()
            status, out = await run_client(HANG, path, "1.0")
            assert status == -signal.SIGKILL, out
            killed_after = time.monotonic() - bystander_started
            for proc in hostile:
                assert proc.stdout is not None
                assert await asyncio.wait_for(proc.stdout.readline(), 120) == b"done\n"
        finally:
            for proc in hostile:
                if proc.returncode is None:
                    proc.kill()
                await proc.wait()
        # Every connect was answered (admitted, or refused over the per-process cap).
        await until(lambda: listener.accepted + listener.refused == 1000 + 2 * 200 + 1)
        await until(lambda: listener.connections == 0)
        stats = server.statistics()
        assert stats.kills == 1, stats
        # The bystander's hang was acted on at once, the flood notwithstanding.
        assert stats.decision_lag_max < 0.05, stats
        assert killed_after < 10, killed_after
        # Each refused connect, run of garbage and half frame is counted.
        assert stats.rejected > listener.refused + 100, (stats, listener.refused)
        assert stats.active_timers == 0
    lines = warnings_of(caplog)
    rejected = [line for line in lines if "reject" in line]
    # Five lines per period (10 s) shared by every connection, and a summary line.
    assert len(rejected) <= 12, "\n".join(rejected)


async def test_a_connection_arms_timers_for_its_own_process_only(
    tmp_path: Path, sleeper: Callable[[], subprocess.Popen[bytes]]
) -> None:
    victim = sleeper()
    code = textwrap.dedent("""
        import os, socket, sys, time
        from aiotimer._protocol import decode_reply, encode_acquire_stamped, encode_hello
        s = socket.socket(socket.AF_UNIX)
        s.connect(sys.argv[1])
        reply = decode_reply(s.recv(4096))
        assert reply.welcome and reply.pid == os.getpid(), reply
        now = time.monotonic()
        victim = int(sys.argv[2])
        s.sendall(encode_hello(victim, 0) + encode_acquire_stamped(victim, "evil", now, now))
        s.sendall(encode_acquire_stamped(os.getpid(), "mine", now + 600, now))
        print("sent", flush=True)
        time.sleep(600)
    """)
    path = tmp_path / "timer.sock"
    async with TimerServer() as server:
        await listen_socket(server, path)
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            code,
            str(path),
            str(victim.pid),
            env=client_env(path),
            stdout=asyncio.subprocess.PIPE,
        )
        try:
            assert proc.stdout is not None
            assert await asyncio.wait_for(proc.stdout.readline(), 60) == b"sent\n"
            await until(lambda: server.statistics().active_timers == 1)
            await asyncio.sleep(0.1)
            stats = server.statistics()
            assert stats.rejected == 2 and stats.kills == 0, stats
            assert victim.poll() is None
        finally:
            proc.kill()
            await proc.wait()
        # The peer exited: its timer went with it, its connection was closed.
        await until(lambda: server.statistics().active_timers == 0)


def test_encoded_frames_for_the_socket_are_the_pipes() -> None:
    # The socket speaks exactly the pipes' frames: what a PipeClient writes decodes here.
    from aiotimer._protocol import FrameDecoder

    data = encode_hello(5, 0) + encode_release(5, "s")
    requests, errors = FrameDecoder().feed(data)
    assert [r.pid for r in requests] == [5, 5] and errors == []
    assert issubclass(SocketListener, object)


# -- over a cap --------------------------------------------------------------------------------


async def test_a_process_over_the_connection_cap_is_refused_loudly(tmp_path: Path) -> None:
    path = tmp_path / "timer.sock"
    async with TimerServer() as server:
        listener = await listen_socket(server, path, max_connections=1)
        holder = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            HANG,
            "600",
            env=client_env(path),
            stdout=asyncio.subprocess.PIPE,
        )
        try:
            assert holder.stdout is not None
            assert await asyncio.wait_for(holder.stdout.readline(), 60) == b"armed\n"
            status, out = await run_client(TRY, path)
            assert status == 3, out
            assert "its cap (max_connections=1)" in out, out
            assert listener.refused == 1
        finally:
            holder.kill()
            await holder.wait()
        with pytest.raises(ValueError, match=r"`max_connections` must be an int >= 1, got 0"):
            await listen_socket(server, tmp_path / "other.sock", max_connections=0)


async def test_a_process_that_closed_its_connection_and_hangs_is_still_killed(
    tmp_path: Path,
) -> None:
    code = textwrap.dedent("""
        import time, aiotimer
        with aiotimer.expires(after=0.3, scope="closed and hung"):
            aiotimer.get_client()._conn.sock.close()
            time.sleep(600)
    """)
    path = tmp_path / "timer.sock"
    async with TimerServer() as server:
        listener = await listen_socket(server, path)
        status, out = await run_client(code, path)
        assert status == -signal.SIGKILL, out
        assert listener.connections == 0


async def test_a_process_that_closed_its_pipe_and_hangs_is_still_killed(tmp_path: Path) -> None:
    """As for the pipes: the timers armed through it stay armed until the process exits."""
    code = textwrap.dedent("""
        import os, time, aiotimer
        with aiotimer.expires(after=1.0, scope="pipe closed and hung"):
            os.close(aiotimer.get_client()._conn.pipe)
            print("closed", flush=True)
            time.sleep(600)
    """)
    path = tmp_path / "timer.sock"
    async with TimerServer() as server:
        listener = await listen_socket(server, path)
        status, out = await run_client(code, path)
        assert status == -signal.SIGKILL and "closed" in out, out
        stats = server.statistics()
        assert stats.kills == 1 and stats.rejected == 0, stats
        assert listener.piped == 1
        await until(lambda: listener.connections == 0)


def pipes_held() -> int:
    """Pipes this process holds open, and files and sockets of no path (unlinked, unnamed)."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            link = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        count += link.startswith(("pipe:", "socket:")) or link.endswith("(deleted)")
    return count


#: A peer that hands over what it should not, one connection per way; then a pipe and
#: frames on the connection after it.  Prints whether the server closed each connection.
BAD_FDS = textwrap.dedent("""
    import os, socket, sys, tempfile, time
    from aiotimer._protocol import decode_reply, encode_hello, encode_release

    def connect():
        s = socket.socket(socket.AF_UNIX)
        s.connect(sys.argv[1])
        reply = decode_reply(s.recv(4096))
        assert reply.welcome, reply
        return s

    def closed_by_server(s):
        s.settimeout(60)
        try:
            return s.recv(1) == b""
        except OSError:
            return True

    hello = encode_hello(os.getpid(), 0)
    held = []
    for way in ("file", "socket", "two", "twice", "write end"):
        s = connect()
        r, w = os.pipe()
        if way == "file":
            held.append(tempfile.TemporaryFile())
            fds = [held[-1].fileno()]
        elif way == "socket":
            held.append(socket.socketpair())
            fds = [held[-1][0].fileno()]
        elif way == "two":
            fds = [r, os.pipe()[0]]
        elif way == "twice":
            socket.send_fds(s, [hello], [r])
            fds = [os.pipe()[0]]
        else:
            fds = [w]
        socket.send_fds(s, [hello], fds)
        print(way, "closed" if closed_by_server(s) else "open", flush=True)
        s.close()
        held.append((r, w))
    s = connect()
    r, w = os.pipe()
    socket.send_fds(s, [hello], [r])
    os.close(r)
    s.sendall(encode_release(os.getpid(), "on the connection"))
    os.write(w, encode_release(os.getpid(), "through the pipe"))
    print("done", flush=True)
    time.sleep(600)
""")


async def test_a_peer_handing_over_anything_but_one_pipe_is_rejected_and_closed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="aiotimer")
    path = tmp_path / "timer.sock"
    async with TimerServer() as server:
        listener = await listen_socket(server, path)
        pipes_before = pipes_held()
        peer = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            BAD_FDS,
            str(path),
            env=client_env(path),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        try:
            assert peer.stdout is not None
            lines = [
                (await asyncio.wait_for(peer.stdout.readline(), 120)).decode() for _ in range(6)
            ]
            assert lines == [
                "file closed\n",
                "socket closed\n",
                "two closed\n",
                "twice closed\n",
                "write end closed\n",
                "done\n",
            ], lines
            # A bystander's hang is still killed.
            status, out = await run_client(HANG, path, "0.5")
            assert status == -signal.SIGKILL, out
            # Five bad handovers, and the bytes sent on the connection after a good one;
            # the release through that pipe is taken.
            await until(lambda: server.statistics().rejected == 6)
            await until(lambda: listener.piped == 3)  # "twice"'s first, the last, the bystander's
            stats = server.statistics()
            assert stats.kills == 1 and stats.rejected == 6, stats
            assert listener.connections == 1
        finally:
            if peer.returncode is None:
                peer.kill()
            await peer.wait()
        await until(lambda: listener.connections == 0)
        assert server.statistics().rejected == 6
        # The server holds no fd the peer sent once it went: every received fd was closed.
        assert pipes_held() == pipes_before
    lines = [w for w in warnings_of(caplog) if "handed over" in w]
    assert 1 <= len(lines) <= 6, lines


async def test_the_peer_cannot_make_the_servers_reads_of_its_pipe_blocking(tmp_path: Path) -> None:
    """The peer may keep the read end it sent and clear ``O_NONBLOCK`` on it: that flag is
    its open file's, and a read on the loop would then block when the peer drained the pipe
    first.  The server reads through a description of its own."""
    code = textwrap.dedent("""
        import os, socket, sys, time
        from aiotimer._protocol import decode_reply, encode_hello
        s = socket.socket(socket.AF_UNIX)
        s.connect(sys.argv[1])
        assert decode_reply(s.recv(4096)).welcome
        r, w = os.pipe()
        socket.send_fds(s, [encode_hello(os.getpid(), 0)], [r])
        time.sleep(0.5)  # the server has set up its reading of the pipe
        os.set_blocking(r, True)  # kept, and made blocking
        print("blocking", flush=True)
        time.sleep(600)
    """)
    path = tmp_path / "timer.sock"
    async with TimerServer() as server:
        listener = await listen_socket(server, path)
        peer = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            code,
            str(path),
            env=client_env(path),
            stdout=asyncio.subprocess.PIPE,
        )
        try:
            assert peer.stdout is not None
            assert await asyncio.wait_for(peer.stdout.readline(), 60) == b"blocking\n"
            assert listener.piped == 1
            [channel] = listener._connections.values()
            assert channel._pipe >= 0 and not os.get_blocking(channel._pipe)
            with pytest.raises(BlockingIOError):
                os.read(channel._pipe, 1)  # empty: EAGAIN, never a wait
        finally:
            peer.kill()
            await peer.wait()
        await until(lambda: listener.connections == 0)


# -- aiotimer serve and run: the socket in the job's environment ------------------------------

#: A command whose child (no fd inherited: close_fds, as torchrun starts its workers) uses
#: aiotimer's own API and hangs in a block.
GRANDCHILD = textwrap.dedent("""
    import os, subprocess, sys
    print("command sees", "TORCHELASTIC_ENABLE_FILE_TIMER" in os.environ,
          os.environ["AIOTIMER_SOCKET"] != "", flush=True)
    child = (
        "import os, time, aiotimer\\n"
        "assert not os.path.exists('/proc/self/fd/' + os.environ['AIOTIMER_FD'])"
        " or os.fstat(int(os.environ['AIOTIMER_FD'])).st_ino"
        " != int(os.environ['AIOTIMER_FD_INODE'])\\n"
        "print('client', type(aiotimer.get_client()).__name__, flush=True)\\n"
        "with aiotimer.expires(after=0.5, scope='grandchild'):\\n"
        "    time.sleep(600)\\n"
    )
    status = subprocess.run([sys.executable, "-c", child]).returncode
    print("grandchild exited", status, flush=True)
""")


def test_serve_exports_the_socket_and_a_non_child_process_is_killed(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIOTIMER_")}
    env.pop("TORCHELASTIC_TIMER_FILE", None)
    env["TORCHELASTIC_ENABLE_FILE_TIMER"] = "1"
    result = subprocess.run(
        [sys.executable, "-m", "aiotimer", "serve", "--", sys.executable, "-c", GRANDCHILD],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    assert "command sees False True" in out, out
    assert "client SocketClient" in out and "grandchild exited -9" in out, out
    assert out.count("unset TORCHELASTIC_ENABLE_FILE_TIMER") == 1, out


def test_run_exports_the_socket_too(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIOTIMER_")}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "aiotimer",
            "run",
            "-n",
            "1",
            "--dump-timeout",
            "0",
            "--",
            sys.executable,
            "-c",
            GRANDCHILD,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    out = result.stdout + result.stderr
    assert "client SocketClient" in out and "grandchild exited -9" in out, out
