"""What every transport shares: a channel of requests, and who may use it for whom."""

from __future__ import annotations

import abc
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .._server import TimerServer
    from .._workers import WatchedProcess

__all__ = ["Channel"]


class Channel(abc.ABC):
    """One source of requests feeding a server.

    A channel caches the processes its requests named, so the entitlement
    check (may this sender arm a timer that kills that pid?) runs once per
    process, not once per request.
    """

    #: shown in logs and events
    name: str = "channel"

    def __init__(self, server: TimerServer) -> None:
        self.server = server
        self.processes: dict[int, WatchedProcess] = {}

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"

    @abc.abstractmethod
    def entitled(self, pid: int) -> str | None:
        """``None`` if requests on this channel may name ``pid``, else the reason not."""

    def close(self) -> None:  # noqa: B027 - most channels hold nothing to close
        """Stop reading; the server calls this when it closes."""
