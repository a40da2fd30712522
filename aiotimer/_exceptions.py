"""The exception families of aiotimer, under one root."""

from __future__ import annotations

__all__ = [
    "AiotimerError",
    "ClientNotConfiguredError",
    "NotEntitledError",
    "ProtocolError",
    "ServerUnavailableError",
]


class AiotimerError(Exception):
    """Root of every exception aiotimer raises on purpose."""


class ProtocolError(AiotimerError, ValueError):
    """A request on the wire was malformed or out of range; it was rejected."""


class ClientNotConfiguredError(AiotimerError, RuntimeError):
    """A timer was used in a process that has no client and no server to find.

    A ``RuntimeError``, as torch raises in the same case.
    """


class ServerUnavailableError(AiotimerError, BrokenPipeError):
    """The timer server cannot be reached (it exited, or never listened).

    A ``BrokenPipeError``, as torch raises in the same case.
    """


class NotEntitledError(AiotimerError, PermissionError):
    """The timer server refused this process: its reason is the message.

    Raised on entering a timer block when the server will not arm timers for
    this process (it runs as another user, does not descend from the server or
    a configured root, or is over a cap).  Never silent: a block that cannot be
    protected does not run as if it were.  A ``PermissionError``.
    """
