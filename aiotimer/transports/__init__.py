"""The ways requests reach a ``TimerServer``: one module per transport."""

from ._base import Channel as Channel
from ._local import LocalChannel as LocalChannel
from ._pipe import PipeChannel as PipeChannel

__all__ = ["Channel", "LocalChannel", "PipeChannel"]
