"""Client cost: one enter+exit of a deadline block, with and without an explicit scope."""

from __future__ import annotations

import asyncio
import os
import subprocess
import tempfile
import time
import timeit
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import aiotimer

CALLS = 20_000


#: Each figure is the best of this many rounds of ``calls / ROUNDS`` calls: a
#: machine shared with other work can only make a round slower, never faster.
ROUNDS = 5


def _per_call_us(fn: Callable[[], None], calls: int) -> float:
    fn()  # warm up
    number = max(1, calls // ROUNDS)
    return min(timeit.repeat(fn, repeat=ROUNDS, number=number)) / number * 1e6


@contextmanager
def _drained_pipe() -> Iterator[int]:
    """A pipe whose read end a separate process drains, as a server would."""
    r, w = os.pipe()
    drain = subprocess.Popen(["cat"], stdin=r, stdout=subprocess.DEVNULL)
    os.close(r)
    try:
        yield w
    finally:
        os.close(w)
        drain.wait()


def aiotimer_client(calls: int = CALLS) -> dict[str, float]:
    """``expires()`` and ``timer()`` over aiotimer's pipe client."""
    with _drained_pipe() as fd:
        client = aiotimer.PipeClient(fd)
        aiotimer.configure(client)
        try:

            def scoped() -> None:
                with aiotimer.expires(after=60, scope="step"):
                    pass

            def unscoped() -> None:
                with aiotimer.expires(after=60):
                    pass

            async def async_calls() -> float:
                number = max(1, calls // ROUNDS)
                best = float("inf")
                for _ in range(ROUNDS):
                    t0 = time.perf_counter()
                    for _ in range(number):
                        async with aiotimer.timer(after=60, scope="step"):
                            pass
                    best = min(best, time.perf_counter() - t0)
                return best / number * 1e6

            return {
                "expires(scope=...)": _per_call_us(scoped, calls),
                "expires()": _per_call_us(unscoped, calls),
                "timer(scope=...)": asyncio.run(async_calls()),
            }
        finally:
            aiotimer.configure(None)


def torch_client(calls: int = CALLS) -> dict[str, float]:
    """torch's ``expires`` with its FileTimerClient (FIFO drained) and LocalTimerClient."""
    import multiprocessing as mp

    from torch.distributed.elastic.timer import FileTimerClient, LocalTimerClient, expires

    results: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        fifo = os.path.join(tmp, "f")
        os.mkfifo(fifo)
        reader = os.open(fifo, os.O_RDWR)  # O_RDWR: open without waiting for a writer
        drain = subprocess.Popen(["cat"], stdin=reader, stdout=subprocess.DEVNULL)
        os.close(reader)
        try:
            file_client: Any = FileTimerClient(fifo)
            n = max(200, calls // 20)  # it opens and closes the FIFO per request: slow
            results["file: expires(scope=...)"] = _per_call_us(
                lambda: _torch_block(expires, file_client, "step"), n
            )
            results["file: expires()"] = _per_call_us(
                lambda: _torch_block(expires, file_client, None), n
            )
        finally:
            drain.kill()
            drain.wait()
    queue: Any = mp.get_context("spawn").Queue()
    local_client = LocalTimerClient(queue)
    n = max(200, calls // 4)
    results["local: expires(scope=...)"] = _per_call_us(
        lambda: _torch_block(expires, local_client, "step"), n
    )
    results["local: expires()"] = _per_call_us(lambda: _torch_block(expires, local_client, None), n)
    queue.cancel_join_thread()
    queue.close()
    return results


def _torch_block(expires: Any, client: Any, scope: str | None) -> None:
    with expires(after=60, scope=scope, client=client):
        pass


def import_cost_ms(runs: int = 15) -> dict[str, float]:
    """Milliseconds a fresh interpreter spends on the client's imports, above a bare one.

    The median over ``runs`` starts of ``python -c pass`` and of the same with the
    import a worker makes (aiotimer's client; torch's timer client, when installed).
    """
    import statistics
    import sys

    def start(code: str) -> float:
        times = []
        for _ in range(runs):
            begin = time.perf_counter()
            subprocess.run([sys.executable, "-c", code], check=True)
            times.append(time.perf_counter() - begin)
        return statistics.median(times) * 1e3

    bare = start("pass")
    costs = {
        "aiotimer: import aiotimer; aiotimer.expires": start("import aiotimer; aiotimer.expires")
        - bare
    }
    try:
        import importlib.util

        if importlib.util.find_spec("torch") is not None:
            costs["torch: import torch.distributed.elastic.timer"] = (
                start("import torch.distributed.elastic.timer") - bare
            )
    except (ImportError, ValueError):
        pass
    return costs
