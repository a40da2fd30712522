"""A process that imports torch once and forks benchmark workers from itself.

Workers forked from one torch-importing process start in milliseconds and share
its memory, so 64 of them fit on a small machine; the floor of these workers is
measured with the same kind of workers.

    python _torchhost.py MODE [FIFO] [MAX_INTERVAL]

MODE is ``none`` (no timer: the floor), ``client-file`` (torch ``FileTimerClient``
to a server elsewhere: aiotimer's FIFO listener), ``host-file`` (also host torch's
``FileTimerServer``) or ``host-local`` (host torch's ``LocalTimerServer`` and
use ``LocalTimerClient``).  Commands on stdin, one per line:

- ``kill N``: fork N workers and print their pids; then read a CLOCK_MONOTONIC
  deadline, have each arm a timer expiring then and hang, and print ``armed`` once
  all have.  The host prints ``decision <seconds>`` for each kill a hosted torch
  server reports.
- ``pump W SECONDS``: fork W workers that run acquire+release pairs for SECONDS,
  then print ``pumped <pairs> <errors>`` totals and ``processed <requests>``
  (what a hosted torch server registered) once the server has caught up or a
  second passed.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import sys
import time
from typing import Any

from torch.distributed.elastic.timer import (
    FileTimerClient,
    FileTimerServer,
    LocalTimerClient,
    LocalTimerServer,
)

from aiotimer._linux import die_with_parent

MODE = sys.argv[1]
FIFO = sys.argv[2] if len(sys.argv) > 2 else ""
MAX_INTERVAL = float(sys.argv[3]) if len(sys.argv) > 3 else 0.01
_registered = 0


def say(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def wall(monotonic_deadline: float) -> float:
    return monotonic_deadline - time.monotonic() + time.time()


class CountingFileServer(FileTimerServer):
    def register_timers(self, timer_requests: Any) -> None:
        global _registered
        _registered += len(timer_requests)
        super().register_timers(timer_requests)


class CountingLocalServer(LocalTimerServer):
    def register_timers(self, timer_requests: Any) -> None:
        global _registered
        _registered += len(timer_requests)
        super().register_timers(timer_requests)

    def _reap_worker(self, worker_id: int) -> bool:
        ok = super()._reap_worker(worker_id)
        say(f"decision {time.time()!r}")
        return ok


def log_event(name: str, request: Any) -> None:
    if name == "kill worker process":
        say(f"decision {time.time()!r}")


queue: Any = None
server: Any = None
if MODE == "host-local":
    queue = mp.get_context("fork").Queue()
    server = CountingLocalServer(queue, max_interval=MAX_INTERVAL)
    server.start()
elif MODE == "host-file":
    server = CountingFileServer(FIFO, "bench", max_interval=MAX_INTERVAL, log_event=log_event)
    server.start()  # its thread then blocks opening the FIFO until a client opens it


def client() -> Any:
    if MODE == "host-local":
        return LocalTimerClient(queue)
    if MODE in ("host-file", "client-file"):
        return FileTimerClient(FIFO)
    return None


def fork(body: Any) -> tuple[int, int]:
    r, w = os.pipe()
    parent = os.getpid()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        die_with_parent(parent)  # a worker never outlives its host (and holds no FIFO open)
        try:
            body(w)
        finally:
            os._exit(0)
    os.close(w)
    return pid, r


def hang(command_fd: int) -> None:
    """A worker: wait for the deadline, arm a timer expiring then, report, hang."""
    with os.fdopen(command_fd) as commands:
        deadline = float(commands.readline())
    c = client()
    if c is not None:
        # torch's client fails when the FIFO is full (flooders may fill it):
        # retry, as a worker that must arm its timer would.
        for _ in range(10_000):
            try:
                c.acquire("hang", wall(deadline))
                break
            except OSError:
                time.sleep(0.001)
    os.write(1, b"armed\n")
    while True:
        time.sleep(3600)


def kill(n: int) -> None:
    pipes = []
    pids = []
    for _ in range(n):
        r, w = os.pipe()
        pid, status = fork(lambda _status, r=r: hang(r))
        os.close(r)
        os.close(status)
        pipes.append(w)
        pids.append(pid)
    say(" ".join(map(str, pids)))
    deadline = sys.stdin.readline()
    for w in pipes:
        os.write(w, deadline.encode())
        os.close(w)


def pump(workers: int, seconds: float) -> None:
    end = time.monotonic() + seconds

    def body(w: int) -> None:
        c = client()
        pairs = errors = 0
        while time.monotonic() < end:
            try:
                c.acquire("s", time.time() + 60)
                c.release("s")
                pairs += 1
            except Exception:
                errors += 1
        os.write(w, f"{pairs} {errors}\n".encode())

    children = [fork(body) for _ in range(workers)]
    pairs = errors = 0
    for pid, r in children:
        with os.fdopen(r) as f:
            p, e = f.read().split()
        pairs += int(p)
        errors += int(e)
        os.waitpid(pid, 0)
    say(f"pumped {pairs} {errors}")
    # Give the server a moment to drain, then report what it registered.
    settle = time.monotonic() + 1.0
    last = -1
    while time.monotonic() < settle and _registered != last:
        last = _registered
        time.sleep(0.2)
    say(f"processed {_registered}")


say("ready")
for line in sys.stdin:
    cmd, *args = line.split()
    if cmd == "kill":
        kill(int(args[0]))
    elif cmd == "pump":
        pump(int(args[0]), float(args[1]))
    elif cmd == "quit":
        break
if server is not None and MODE == "host-local":
    server._stop_signaled = True
    if MAX_INTERVAL <= 1:  # stop() joins for up to max_interval: a minute at torch's default
        server.stop()
