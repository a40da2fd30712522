"""A benchmark worker: arms one timer at the deadline the harness sends, then hangs.

argv[1] is the mode: ``aiotimer`` (pipe client), ``none`` (the floor: no timer) or
``pump SECONDS`` (throughput).  The harness writes the absolute CLOCK_MONOTONIC
deadline on stdin; the worker arms its timer, prints ``armed`` and hangs.  Workers
with torch's clients come from ``_torchhost.py``.
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


def main() -> None:
    mode = sys.argv[1]
    if mode == "pump":
        pump(float(sys.argv[2]))
        return
    # Every plain worker imports aiotimer, timer or not: the floor's workers must be
    # the same processes (the same memory to tear down) as the measured ones.
    import aiotimer

    print("ready", flush=True)
    deadline = float(sys.stdin.readline())
    if mode == "aiotimer":
        aiotimer.get_client().acquire("hang", deadline)
    print("armed", flush=True)
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    main()
