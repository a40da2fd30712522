"""What every transport shares: a channel of requests, where it sends them, who hosts it.

In the core (not in ``transports``): the dispatcher and the server import it
without loading every transport, ``multiprocessing`` included.

A transport reads bytes, decodes them with ``_protocol`` and hands the requests
to a ``RequestSink``; it never reaches into the server.  ``Host`` is what a
listener needs of the server it is attached to.
"""

from __future__ import annotations

import abc
import asyncio
import itertools
from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

from ._linux import tree_root
from ._protocol import Request

if TYPE_CHECKING:
    from ._processes import SpawnedTree

__all__ = ["Channel", "Host", "Listener", "RequestSink"]

_channel_ids = itertools.count(1)


class RequestSink(Protocol):
    """Where a transport delivers what it decoded (the server's dispatcher)."""

    def dispatch(
        self, channel: Channel, requests: Sequence[Request], errors: Sequence[str] = ()
    ) -> None:
        """Apply ``requests`` from ``channel``; each of ``errors`` is a rejected request."""

    def channel_closed(self, channel: Channel) -> None:
        """``channel`` will deliver nothing more."""

    def admit(self, channel: Channel, pid: int, pidfd: int | None = None) -> str | None:
        """Admit ``pid`` on ``channel`` before it sends anything; ``None``, or why not.

        For a connection whose peer the kernel named (a socket's, on accept): a
        refusal can be answered at once.  ``pidfd``, if given, holds that very
        process; it is taken over (kept, or closed).
        """

    def reject(
        self, channel: Channel, reason: str, kind: str = "malformed", *, log: bool = True
    ) -> None:
        """Count one refused request or connection on ``channel``; log it at a bounded
        rate, unless ``log`` is false (it was said already)."""


class Listener(Protocol):
    """Something a server closes when it closes (a FIFO listener, a queue bridge)."""

    async def aclose(self) -> None:
        """Stop listening and release what it holds."""


class Host(Protocol):
    """What a transport needs of the server it feeds (``TimerServer`` is one)."""

    @property
    def sink(self) -> RequestSink:
        """Where requests go."""

    def running_loop(self) -> asyncio.AbstractEventLoop:
        """The loop the server runs on; raises ``RuntimeError`` if it is not running."""

    def add_listener(self, listener: Listener) -> None:
        """Close ``listener`` when the server closes."""

    def add_channel(self, channel: Channel) -> None:
        """Keep ``channel`` (a socket's connection): told of its processes' exits, closed
        with the server, forgotten once it says ``channel_closed``."""

    @property
    def dump_signal(self) -> int | None:
        """The signal clients should register a stack dump on (``None``: none)."""

    @property
    def dump_dir(self) -> str | None:
        """The directory clients write their stack dumps into (``None``: stderr)."""


class Channel(abc.ABC):
    """One source of requests feeding a server.

    Each request names a pid; the first time a channel names one, the server
    asks ``entitled(pid)`` whether this channel's senders may arm timers that
    kill it.  ``revalidate`` channels carry bare pids with no greeting from a
    new process, so a known pid is re-checked (is it still the same process?)
    on every request.
    """

    #: shown in logs and events
    name: str = "channel"
    #: re-check on every request that a known pid is still the same process
    revalidate: bool = False
    #: the spawned process whose pipe this is, if any
    spawned: SpawnedTree | None = None
    #: the pids whose descendants this channel serves (besides a worker's own tree)
    roots: frozenset[int] = frozenset()

    def __init__(self, sink: RequestSink) -> None:
        self.sink = sink
        #: unique in this process; heap entries record it
        self.id = next(_channel_ids)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"

    @abc.abstractmethod
    def entitled(self, pid: int) -> str | None:
        """``None`` if requests on this channel may name ``pid``, else the reason not."""

    @property
    def rejection_group(self) -> tuple[int, str]:
        """The key and name whose bounded rate of rejection log lines this channel's
        count against: its own, or a listener's that all its connections share."""
        return self.id, self.name

    def tree_of(self, pid: int) -> int:
        """The worker tree ``pid`` belongs to, for fair shares: the spawned worker a pipe
        belongs to, or the process just below a root that ``pid`` descends from."""
        if self.spawned is not None:
            return self.spawned.pid
        found = tree_root(pid, self.roots) if self.roots else None
        return pid if found is None else found

    def process_exited(self, pid: int) -> None:  # noqa: B027 - most channels need not know
        """A process admitted on this channel exited."""

    def close(self) -> None:  # noqa: B027 - most channels hold nothing to close
        """Stop reading; the server calls this when it closes."""
