"""The ways requests reach a ``TimerServer``: one module per transport."""

from .._channel import Channel as Channel
from .._channel import Host as Host
from .._channel import RequestSink as RequestSink
from .._protocol import Op as Op
from .._protocol import Request as Request
from ._local import LocalChannel as LocalChannel
from ._pipe import PipeChannel as PipeChannel
from .fifo import FifoListener as FifoListener
from .fifo import listen_fifo as listen_fifo
from .mpqueue import QueueBridge as QueueBridge
from .mpqueue import bridge_queue as bridge_queue
from .socket import SocketChannel as SocketChannel
from .socket import SocketListener as SocketListener
from .socket import listen_socket as listen_socket

__all__ = [
    # what a transport produces and where it sends it
    "Op",
    "Request",
    "RequestSink",
    "Host",
    # the transports
    "Channel",
    "FifoListener",
    "LocalChannel",
    "PipeChannel",
    "QueueBridge",
    "SocketChannel",
    "SocketListener",
    "bridge_queue",
    "listen_fifo",
    "listen_socket",
]
