"""Event loops: the one loop factory ("uvloop when installed") and a pidfd child watcher."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from collections.abc import AsyncIterator, Callable

__all__ = ["ENV_LOOP", "available_loops", "loop_factory", "pidfd_child_watcher"]

LoopFactory = Callable[[], asyncio.AbstractEventLoop]


def available_loops() -> dict[str, LoopFactory]:
    """Every loop aiotimer runs on here, by name: ``asyncio`` and, when installed, ``uvloop``."""
    loops: dict[str, LoopFactory] = {"asyncio": asyncio.new_event_loop}
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency where it installs
        return loops
    loops["uvloop"] = uvloop.new_event_loop
    return loops


#: Environment variable choosing the loop of aiotimer's own programs: ``asyncio`` or ``uvloop``.
ENV_LOOP = "AIOTIMER_LOOP"


def loop_factory() -> LoopFactory:
    """The loop aiotimer's own programs run on: uvloop when installed, else asyncio's.

    ``AIOTIMER_LOOP=asyncio`` (or ``uvloop``) in the environment chooses one.
    """
    loops = available_loops()
    wanted = os.environ.get(ENV_LOOP, "").strip().lower()
    if wanted:
        if wanted not in loops:
            raise ValueError(
                f"{ENV_LOOP} must be one of {', '.join(sorted(loops))}, got {wanted!r} "
                "(the watchdog runs on an asyncio event loop)"
            )
        return loops[wanted]
    return loops.get("uvloop", loops["asyncio"])


@contextlib.asynccontextmanager
async def pidfd_child_watcher() -> AsyncIterator[None]:
    """On Python 3.11's own asyncio loop, reap child processes through pidfds meanwhile.

    There, asyncio waits for each child in a thread of its own.  When many
    workers are killed together, those threads wake as the workers die and
    preempt the server while it is still signalling the rest.  Python 3.12+
    watches children through pidfds already, and uvloop has its own watcher, so
    elsewhere this does nothing.  The child watcher is process-wide: an
    application that owns its loop wraps its main coroutine in this (``aiotimer
    run`` and the benchmarks do); a library embedding the server leaves that
    choice to its application.
    """
    loop = asyncio.get_running_loop()
    if sys.version_info >= (3, 12) or not isinstance(loop, asyncio.SelectorEventLoop):
        yield
        return
    previous = asyncio.get_child_watcher()
    watcher = asyncio.PidfdChildWatcher()
    asyncio.set_child_watcher(watcher)
    watcher.attach_loop(loop)
    try:
        yield
    finally:
        asyncio.set_child_watcher(previous)
