"""Targets for spawned workers in the torch-free compat tests (importable by spawn; no torch)."""

from __future__ import annotations

import multiprocessing.queues
import time
from typing import Any

from aiotimer.compat import torch as compat


def stuck_local(mp_queue: multiprocessing.queues.Queue[Any]) -> None:
    compat.configure(compat.LocalTimerClient(mp_queue))
    with compat.expires(after=0.3):
        time.sleep(600)


def happy_local(mp_queue: multiprocessing.queues.Queue[Any]) -> None:
    compat.configure(compat.LocalTimerClient(mp_queue))
    with compat.expires(after=60):
        pass
    # Exiting joins the queue's feeder thread, so both requests are sent.


def put_requests(mp_queue: multiprocessing.queues.Queue[Any], n: int) -> None:
    for i in range(n):
        mp_queue.put(compat.TimerRequest(i + 1, f"scope{i}", float(i)))
