"""Worker-side API: expires() / timer() semantics, scopes, errors."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import stat
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from helpers import until

import aiotimer
from aiotimer import ClientNotConfiguredError, TimerClient, TimerServer


class FakeClient(TimerClient):
    def __init__(self) -> None:
        self.log: list[tuple[str, str, float | None]] = []
        self.armed: dict[str, float] = {}
        self.lock = threading.Lock()

    def acquire(self, scope: str, deadline: float) -> None:
        with self.lock:
            self.log.append(("acquire", scope, deadline))
            self.armed[scope] = deadline

    def release(self, scope: str) -> None:
        with self.lock:
            self.log.append(("release", scope, None))
            self.armed.pop(scope, None)


@pytest.fixture
def client() -> FakeClient:
    fake = FakeClient()
    aiotimer.configure(fake)
    yield fake  # type: ignore[misc]
    aiotimer.configure(None)


def test_expires_acquires_a_monotonic_deadline_and_releases(client: FakeClient) -> None:
    before = time.monotonic()
    with aiotimer.expires(after=30, scope="step") as scope:
        assert scope.state == "armed"
        assert client.armed["step"] == pytest.approx(before + 30, abs=1)
    assert scope.state == "released"
    assert [(op, s) for op, s, _ in client.log] == [("acquire", "step"), ("release", "step")]


def test_default_scope_is_the_call_site(client: FakeClient) -> None:
    with aiotimer.expires(after=1):
        line = __import__("sys")._getframe().f_lineno - 1
    assert client.log[0][1] == f"{__file__}#{line}"


def test_exceptions_propagate_and_the_timer_is_released(client: FakeClient) -> None:
    with pytest.raises(KeyError, match="boom"), aiotimer.expires(after=1, scope="s"):
        raise KeyError("boom")
    assert client.armed == {}


def test_nested_same_scope_does_not_collide(client: FakeClient) -> None:
    def recurse(depth: int) -> None:
        with aiotimer.expires(after=1, scope="recursive"):
            if depth:
                recurse(depth - 1)
            # inner releases must not disarm the outer timers
            assert len(client.armed) == 3 - depth

    recurse(2)
    acquired = [s for op, s, _ in client.log if op == "acquire"]
    assert acquired == ["recursive", "recursive[2]", "recursive[3]"]
    assert client.armed == {}


def test_same_scope_in_threads_does_not_collide(client: FakeClient) -> None:
    barrier = threading.Barrier(4)
    seen: list[str] = []

    def work() -> None:
        with aiotimer.expires(after=1, scope="fetch") as scope:
            barrier.wait(timeout=30)
            seen.append(scope._wire or "")
            barrier.wait(timeout=30)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(seen)) == 4
    assert client.armed == {}


async def test_same_scope_in_concurrent_tasks_does_not_collide(client: FakeClient) -> None:
    async def work() -> None:
        async with aiotimer.timer(after=1, scope="allreduce"):
            await asyncio.sleep(0.01)

    await asyncio.gather(*(work() for _ in range(5)))
    acquired = [s for op, s, _ in client.log if op == "acquire"]
    assert len(set(acquired)) == 5 and client.armed == {}


async def test_soft_timeout_cancels_the_block_with_timeout_error(client: FakeClient) -> None:
    with pytest.raises(TimeoutError):
        async with aiotimer.timer(after=30, scope="s", soft_timeout=0.05) as scope:
            await asyncio.sleep(60)
    assert scope.state == "soft-expired"
    assert client.armed == {}


@pytest.mark.slow
async def test_a_soft_timeout_in_a_spawned_worker_says_which_block_and_why() -> None:
    """Issue 23, item 8: the TimeoutError of a soft timeout had no message at all."""
    code = textwrap.dedent("""
        import asyncio, aiotimer
        async def main():
            try:
                async with aiotimer.timer(after=30, scope="fetch", soft_timeout=0.2):
                    await asyncio.sleep(60)
            except TimeoutError as exc:
                print(f"TimeoutError: {exc}", flush=True)
        asyncio.run(main())
    """)
    async with TimerServer() as server:
        worker = await server.spawn(sys.executable, "-c", code, stdout=asyncio.subprocess.PIPE)
        assert worker.stdout is not None
        out = await asyncio.wait_for(worker.stdout.read(), 60)
        assert await asyncio.wait_for(worker.wait(), 60) == 0
        assert server.statistics().kills == 0 and worker.returncode != -signal.SIGKILL
    assert out.decode() == (
        "TimeoutError: 'fetch' cancelled by its soft timeout after 0.2s "
        "(its hard deadline was 30s)\n"
    )


async def test_timer_without_soft_timeout_lets_the_block_run(client: FakeClient) -> None:
    async with aiotimer.timer(after=30, scope="s"):
        await asyncio.sleep(0.01)
    assert [op for op, _, _ in client.log] == ["acquire", "release"]


def test_explicit_client_argument_wins(client: FakeClient) -> None:
    other = FakeClient()
    with aiotimer.expires(after=1, scope="s", client=other):
        pass
    assert client.log == [] and len(other.log) == 2


def test_no_client_and_no_server_raises_runtime_error() -> None:
    aiotimer.configure(None)
    with (
        pytest.raises(ClientNotConfiguredError, match="no timer client") as info,
        aiotimer.expires(after=1),
    ):
        pass
    assert isinstance(info.value, RuntimeError)


def test_stale_fd_in_environment_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    aiotimer.configure(None)
    r, w = os.pipe()
    os.close(r)
    os.close(w)
    monkeypatch.setenv("AIOTIMER_FD", str(w))
    with pytest.raises(BrokenPipeError, match=f"fd {w} is not open"):
        aiotimer.get_client()
    monkeypatch.setenv("AIOTIMER_FD", "x")
    with pytest.raises(RuntimeError, match="must be integers"):
        aiotimer.get_client()


@pytest.mark.parametrize("after", [0, -1, float("nan"), float("inf")])
def test_bad_after_names_the_parameter_and_value(after: float) -> None:
    with pytest.raises(ValueError, match=r"`after` must be a finite number of seconds > 0, got"):
        aiotimer.expires(after=after)


def test_after_must_be_a_number() -> None:
    with pytest.raises(TypeError, match="`after` must be a number of seconds, got '3'"):
        aiotimer.expires(after="3")  # type: ignore[arg-type]


def test_soft_timeout_must_be_below_after() -> None:
    with pytest.raises(
        ValueError, match=r"`soft_timeout` must be less than `after` \(1.0\), got 2"
    ):
        aiotimer.timer(after=1, soft_timeout=2)


def test_a_scope_cannot_be_entered_twice(client: FakeClient) -> None:
    scope = aiotimer.expires(after=1, scope="s")
    with scope:
        pass
    with pytest.raises(RuntimeError, match="cannot be entered twice"), scope:
        pass
    assert "released" in repr(scope)


def test_configure_rejects_non_clients() -> None:
    with pytest.raises(TypeError, match=r"`client` must be an aiotimer\.TimerClient, got 42"):
        aiotimer.configure(42)  # type: ignore[arg-type]


class WallClockClient:
    """A torch-style client: same two methods, but wall-clock deadlines."""

    def acquire(self, scope_id: str, expiration_time: float) -> None:
        raise AssertionError("never reached: a wall-clock client would expire the block at once")

    def release(self, scope_id: str) -> None:
        raise AssertionError("never reached")


def test_torch_style_clients_are_refused_not_misused() -> None:
    # expires() sends monotonic deadlines: given to a wall-clock client, a 60 s
    # block would have expired at once and its worker been killed.
    with pytest.raises(TypeError, match=r"wall-clock deadlines: use it with aiotimer.compat.torch"):
        aiotimer.configure(WallClockClient())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"`client` must be an aiotimer.TimerClient"):
        aiotimer.expires(after=60, client=WallClockClient())  # type: ignore[arg-type]


# -- how a process finds its server, and running without one on purpose ---------------------


@pytest.fixture
def fresh_client(monkeypatch: pytest.MonkeyPatch) -> None:
    """No client configured or found yet, and the once-per-process warning not yet given."""
    from aiotimer import _client

    aiotimer.configure(None)
    monkeypatch.setattr(_client, "_disabled_warned", False)
    yield  # type: ignore[misc]
    aiotimer.configure(None)


def test_no_server_says_how_to_opt_out(fresh_client: None) -> None:
    with pytest.raises(ClientNotConfiguredError) as info, aiotimer.expires(after=1):
        pass
    message = str(info.value)
    assert "AIOTIMER_DISABLE=1" in message and "aiotimer serve" in message, message


def test_disable_makes_every_block_a_no_op_with_one_warning(
    fresh_client: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AIOTIMER_DISABLE", "1")
    with pytest.warns(RuntimeWarning, match="AIOTIMER_DISABLE=1: no watchdog") as seen:
        with aiotimer.expires(after=0.001, scope="a") as scope:
            time.sleep(0.01)
        assert scope.state == "released"

        async def main() -> None:
            async with aiotimer.timer(after=0.001, scope="b"):
                await asyncio.sleep(0.01)

        asyncio.run(main())
    assert len(seen) == 1
    assert "disabled" in repr(aiotimer.get_client())


def test_disable_wins_over_a_server_in_the_environment(
    fresh_client: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AIOTIMER_DISABLE", "yes")
    monkeypatch.setenv("AIOTIMER_SOCKET", "/nonexistent/timer.sock")
    with pytest.warns(RuntimeWarning), aiotimer.expires(after=1):
        pass


def test_disable_names_a_value_it_does_not_understand(
    fresh_client: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AIOTIMER_DISABLE", "maybe")
    with pytest.raises(ClientNotConfiguredError, match=r"AIOTIMER_DISABLE='maybe' must be 1"):
        aiotimer.get_client()


def test_a_closed_pipe_fd_falls_back_to_the_socket(
    fresh_client: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    r, w = os.pipe()
    os.close(r)
    os.close(w)
    monkeypatch.setenv("AIOTIMER_FD", str(w))
    monkeypatch.setenv("AIOTIMER_SOCKET", "/run/job/timer.sock")
    client = aiotimer.get_client()
    assert isinstance(client, aiotimer.SocketClient)
    assert client.path == "/run/job/timer.sock"


def test_a_closed_pipe_fd_without_a_socket_names_the_real_cause(
    fresh_client: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    r, w = os.pipe()
    os.close(r)
    os.close(w)
    monkeypatch.setenv("AIOTIMER_FD", str(w))
    with pytest.raises(aiotimer.ServerUnavailableError) as info:
        aiotimer.get_client()
    message = str(info.value)
    assert f"fd {w} is not open" in message
    assert "was not inherited" in message and "torchrun" in message, message
    assert "aiotimer serve" in message and "AIOTIMER_SOCKET" in message, message


def test_a_socket_that_nobody_serves_is_unavailable(
    fresh_client: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("AIOTIMER_SOCKET", str(tmp_path / "timer.sock"))
    with (
        pytest.raises(aiotimer.ServerUnavailableError, match="no timer server listens on"),
        aiotimer.expires(after=1),
    ):
        pass
    with pytest.raises(ValueError, match=r"`connect_timeout` must be a finite number"):
        aiotimer.SocketClient(tmp_path / "s", connect_timeout=0)


def test_the_disabled_warning_is_said_once_per_process(tmp_path: Path) -> None:
    import subprocess
    import sys

    code = (
        "import asyncio, aiotimer\n"
        "for _ in range(3):\n"
        "    with aiotimer.expires(after=1):\n"
        "        pass\n"
        "async def main():\n"
        "    async with aiotimer.timer(after=1):\n"
        "        pass\n"
        "asyncio.run(main())\n"
        "print('ran unprotected')\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIOTIMER_")}
    env["AIOTIMER_DISABLE"] = "1"
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "ran unprotected\n"
    assert result.stderr.count("AIOTIMER_DISABLE=1: no watchdog") == 1, result.stderr


def test_a_full_backlog_is_waited_for_within_the_connect_timeout(tmp_path: Path) -> None:
    """A flood of connects can fill the server's backlog: a client waits for room (a
    non-blocking connect failed at once with EAGAIN), up to its connect timeout."""
    import socket

    from aiotimer._protocol import Reply, encode_reply

    path = str(tmp_path / "timer.sock")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path)
    listener.listen(0)
    fillers = []
    while True:  # fill the backlog
        filler = socket.socket(socket.AF_UNIX)
        filler.setblocking(False)
        try:
            filler.connect(path)
        except BlockingIOError:
            filler.close()
            break
        fillers.append(filler)
    try:
        started = time.monotonic()
        with pytest.raises(aiotimer.ServerUnavailableError, match=r"did not answer within 0.3s"):
            aiotimer.SocketClient(path, connect_timeout=0.3).release("s")
        assert time.monotonic() - started >= 0.25

        accepted: list[socket.socket] = []

        def serve() -> None:  # room in the backlog after 0.2 s, and a welcome for each
            time.sleep(0.2)
            for _ in range(len(fillers) + 1):
                conn, _ = listener.accept()
                conn.sendall(encode_reply(Reply(True, os.getpid(), 0, "")))
                # Kept open: closed at once, the client's greeting could meet EPIPE.
                accepted.append(conn)

        thread = threading.Thread(target=serve)
        thread.start()
        client = aiotimer.SocketClient(path, connect_timeout=30)
        client.release("s")
        client.close()
        thread.join()
        for conn in accepted:
            conn.close()
    finally:
        for filler in fillers:
            filler.close()
        listener.close()


def _fake_server_connection(
    listener: socket.socket, pid: int
) -> tuple[socket.socket, int, list[tuple[str, int, str]]]:
    """Accept a connection, welcome it, take the pipe it hands over: the connection, the
    pipe's read end, and the frames that came with it (op, pid, scope)."""
    from aiotimer._protocol import FrameDecoder, Reply, encode_reply

    conn, _ = listener.accept()
    conn.sendall(encode_reply(Reply(True, pid, 0, "")))
    data, fds, _, _ = socket.recv_fds(conn, 4096, 2)
    assert len(fds) == 1 and stat.S_ISFIFO(os.fstat(fds[0]).st_mode), fds
    requests, errors = FrameDecoder().feed(data)
    assert errors == []
    return conn, fds[0], [(r.op.name, r.pid, r.scope) for r in requests]


def _read_frames(pipe: int, count: int) -> list[tuple[str, int, str]]:
    from aiotimer._protocol import FrameDecoder

    decoder = FrameDecoder()
    frames: list[tuple[str, int, str]] = []
    while len(frames) < count:
        requests, errors = decoder.feed(os.read(pipe, 4096))
        assert errors == []
        frames += [(r.op.name, r.pid, r.scope) for r in requests]
    return frames


def test_requests_go_through_a_pipe_and_epipe_connects_once_more(tmp_path: Path) -> None:
    """The greeting comes with the pipe's read end; requests through the pipe.  When the
    server goes (its read end closes), the next write meets EPIPE: the client connects
    again, and the new pipe takes the old one's fd number (a thread still holding it never
    writes into an fd the number was reused for)."""
    path = str(tmp_path / "timer.sock")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path)
    listener.listen(4)
    seen: list[list[tuple[str, int, str]]] = []
    first_gone = threading.Event()
    failures: list[BaseException] = []

    def serve() -> None:
        try:
            for n in range(2):
                conn, pipe, hello = _fake_server_connection(listener, 4242)
                seen.append(hello + _read_frames(pipe, 1))
                os.close(pipe)
                conn.close()
                if n == 0:
                    first_gone.set()
        except BaseException as exc:
            failures.append(exc)
            first_gone.set()

    thread = threading.Thread(target=serve)
    thread.start()
    client = aiotimer.SocketClient(path, connect_timeout=30)
    try:
        client.release("first")
        assert client._conn is not None
        number = client._conn.pipe
        assert first_gone.wait(60)
        client.release("second")  # EPIPE, then a new connection
        assert client._conn is not None and client._conn.pipe == number
        thread.join(60)
        assert failures == []
        assert seen == [
            [("HELLO", 4242, ""), ("RELEASE", 4242, "first")],
            [("HELLO", 4242, ""), ("RELEASE", 4242, "second")],
        ]
    finally:
        client.close()
        thread.join(60)
        listener.close()
    assert client._conn is None and client._spare < 0
    with pytest.raises(OSError):
        os.fstat(number)


FORK = textwrap.dedent("""
    import os, sys, aiotimer
    client = aiotimer.get_client()
    with aiotimer.expires(after=60, scope="parent"):
        pass
    conn = client._conn
    pipe = f"pipe:[{os.fstat(conn.pipe).st_ino}]"
    pid = os.fork()
    if pid == 0:
        # Before it uses anything: the parent's connection and pipe are not the child's.
        links = []
        for fd in os.listdir("/proc/self/fd"):
            try:
                links.append(os.readlink(f"/proc/self/fd/{fd}"))
            except OSError:
                pass
        inherited = client._conn is not None or pipe in links
        with aiotimer.expires(after=60, scope="child"):
            pass
        own = f"pipe:[{os.fstat(client._conn.pipe).st_ino}]" != pipe
        print("child inherited", inherited, "own", own, flush=True)
        sys.stdin.readline()  # until the server has read its requests: an exit before
        os._exit(0)  # its greeting is read would make that a rejection
    os.waitpid(pid, 0)
    with aiotimer.expires(after=60, scope="parent again"):
        pass
    print("parent kept", client._conn is conn, flush=True)
""")


@pytest.mark.slow
async def test_a_forked_child_drops_its_parents_connection_and_pipe(tmp_path: Path) -> None:
    from aiotimer.transports import listen_socket

    path = tmp_path / "timer.sock"
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIOTIMER_")}
    env["AIOTIMER_SOCKET"] = str(path)
    async with TimerServer() as server:
        listener = await listen_socket(server, path)
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            FORK,
            env=env,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 60)).decode()
        assert line == "child inherited False own True\n", line
        # The parent's and the child's: a greeting, an acquire and a release each.
        await until(lambda: server.statistics().requests >= 6)
        out = (await asyncio.wait_for(proc.communicate(b"\n"), 60))[0].decode()
        assert proc.returncode == 0, out
        assert "parent kept True" in out, out
        assert listener.accepted == 2 and listener.piped == 2
        stats = server.statistics()
        assert stats.rejected == 0 and stats.kills == 0, stats
