"""Targets for multiprocessing workers in the torch compatibility tests (importable by spawn)."""

import time


def stuck_local(mp_queue):  # type: ignore[no-untyped-def]
    import torch.distributed.elastic.timer as timer

    timer.configure(timer.LocalTimerClient(mp_queue))
    with timer.expires(after=0.3):
        time.sleep(600)


def recursive(mp_queue, n: int, sleep: float) -> None:  # type: ignore[no-untyped-def]
    import torch.distributed.elastic.timer as timer

    timer.configure(timer.LocalTimerClient(mp_queue))

    def func(depth: int) -> None:
        if depth > 0:
            with timer.expires(after=0.5):
                func(depth - 1)
                time.sleep(sleep)

    func(n)
    time.sleep(0.2)  # mp.Queue.put is asynchronous: let the feeder thread flush
