"""A normal-priority process that sleeps 1 ms at a time: how late does it wake?

It measures the scheduler's floor under a load: no process at normal priority
(a watchdog server included) can act sooner after its alarm than such a
sleeper wakes.  It runs until stdin closes, then prints one line: the p50,
p99 and max oversleep in milliseconds.
"""

from __future__ import annotations

import select
import sys
import time

NAP = 0.001


def main() -> None:
    late: list[float] = []
    poller = select.poll()
    poller.register(sys.stdin.fileno(), select.POLLIN)
    while True:
        before = time.monotonic()
        if poller.poll(0):
            break  # stdin closed (or written to): done
        time.sleep(NAP)
        late.append(time.monotonic() - before - NAP)
    late.sort()
    n = len(late)
    pick = [late[min(n - 1, int(q * n))] * 1e3 for q in (0.5, 0.99)] if n else [float("nan")] * 2
    print(f"{pick[0]!r} {pick[1]!r} {(late[-1] * 1e3 if n else float('nan'))!r}", flush=True)


if __name__ == "__main__":
    main()
