"""Worker-side API: expires() / timer() semantics, scopes, errors."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import textwrap
import threading
import time

import pytest

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
