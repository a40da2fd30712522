"""A benchmark worker: arms one timer at the deadline the harness sends, then hangs.

argv[1] is the mode: ``aiotimer`` (pipe client), ``none`` (the floor: no timer),
``pump SECONDS`` (throughput), ``burst COUNT`` (COUNT timers due at one instant)
or ``garbage BYTES`` (random bytes on the request pipe).  The harness writes the
absolute CLOCK_MONOTONIC deadline on stdin; the worker arms its timer(s), prints
``armed`` and hangs.  Workers with torch's clients come from ``_torchhost.py``.
"""

from __future__ import annotations

import sys
import time


def pump(seconds: float) -> None:
    """Run acquire+release pairs through ``aiotimer.expires`` for ``seconds``; report totals."""
    import aiotimer

    print("ready", flush=True)
    sys.stdin.readline()
    end = time.monotonic() + seconds
    pairs = errors = 0
    while time.monotonic() < end:
        for _ in range(100):  # check the clock every 100 pairs
            try:
                with aiotimer.expires(after=60, scope="s"):
                    pass
                pairs += 1
            except OSError:
                errors += 1
    print(f"pumped {pairs} {errors}", flush=True)


def burst(count: int, deadline: float) -> None:
    """Arm ``count`` timers all due at ``deadline`` (absolute frames, in full-pipe writes)."""
    import os

    from aiotimer._protocol import encode_acquire, encode_hello

    fd = int(os.environ["AIOTIMER_FD"])
    pid = os.getpid()
    os.write(fd, encode_hello(pid))
    frame_batch = []
    for i in range(count):
        frame_batch.append(encode_acquire(pid, f"t{i}", deadline))
        if len(frame_batch) == 100:
            os.write(fd, b"".join(frame_batch))
            frame_batch = []
    if frame_batch:
        os.write(fd, b"".join(frame_batch))


def garbage(size: int) -> None:
    """Write ``size`` random bytes to the request pipe, then say ``done``."""
    import os
    import random

    fd = int(os.environ["AIOTIMER_FD"])
    junk = random.Random(5).randbytes(size)
    print("ready", flush=True)
    sys.stdin.readline()
    for i in range(0, size, 65536):
        os.write(fd, junk[i : i + 65536])
    print("done", flush=True)


def main() -> None:
    mode = sys.argv[1]
    if mode == "pump":
        pump(float(sys.argv[2]))
        return
    if mode == "garbage":
        garbage(int(sys.argv[2]))
        return
    # Every plain worker imports aiotimer, timer or not: the floor's workers must be
    # the same processes (the same memory to tear down) as the measured ones.
    import aiotimer

    if mode == "aiotimer":  # connected and greeted before the clock starts (socket: a connect)
        with aiotimer.expires(after=60, scope="warm-up"):
            pass
    print("ready", flush=True)
    deadline = float(sys.stdin.readline())
    if mode == "aiotimer":
        aiotimer.get_client().acquire("hang", deadline)
    elif mode == "burst":
        burst(int(sys.argv[2]), deadline)
    print("armed", flush=True)
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    main()
