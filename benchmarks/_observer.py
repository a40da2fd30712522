"""A separate process that timestamps deaths: the server's loop being busy cannot skew it.

Protocol on stdin/stdout, one line each: the harness writes pids (space-separated),
the observer opens a pidfd for each and answers ``watching``; it then prints
``<pid> <CLOCK_MONOTONIC time of death>`` lines as they die, and ``done`` when
all have died or when stdin says ``stop``.
"""

from __future__ import annotations

import os
import select
import sys
import time


def main() -> None:
    pids = [int(p) for p in sys.stdin.readline().split()]
    poller = select.epoll()
    fds = {}
    for pid in pids:
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            print(f"{pid} nan", flush=True)
            continue
        fds[fd] = pid
        poller.register(fd, select.EPOLLIN)
    poller.register(sys.stdin.fileno(), select.EPOLLIN)
    print("watching", flush=True)
    deaths: list[str] = []
    while fds:
        for fd, _ in poller.poll():
            now = time.monotonic()
            if fd == sys.stdin.fileno():
                fds.clear()  # told to stop
                break
            pid = fds.pop(fd, None)
            if pid is not None:
                poller.unregister(fd)
                os.close(fd)
                deaths.append(f"{pid} {now!r}")
    print("\n".join([*deaths, "done"]), flush=True)


if __name__ == "__main__":
    main()
