"""aiotimer: an asyncio-native watchdog timer server for training and job orchestrators.

Worker side::

    with aiotimer.expires(after=30):               # sync code
        ...
    async with aiotimer.timer(after=30, scope="allreduce"):
        ...

Launcher side::

    async with aiotimer.TimerServer() as server:
        worker = await server.spawn(sys.executable, "train.py")
        await worker.wait()
"""

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._client import PipeClient as PipeClient
    from ._client import SocketClient as SocketClient
    from ._client import TimerClient as TimerClient
    from ._client import TimerScope as TimerScope
    from ._client import configure as configure
    from ._client import expires as expires
    from ._client import get_client as get_client
    from ._client import timer as timer
    from ._clock import Clock as Clock
    from ._clock import SystemClock as SystemClock
    from ._eventlog import JsonEventLog as JsonEventLog
    from ._events import Event as Event
    from ._events import EventBus as EventBus
    from ._events import IncidentRecorded as IncidentRecorded
    from ._events import KillWorkerProcess as KillWorkerProcess
    from ._events import LogEvent as LogEvent
    from ._events import RequestRejected as RequestRejected
    from ._events import SignalSent as SignalSent
    from ._events import Statistics as Statistics
    from ._events import TimerExpired as TimerExpired
    from ._events import WatchdogStarted as WatchdogStarted
    from ._events import WatchdogStopped as WatchdogStopped
    from ._events import WorkerExited as WorkerExited
    from ._exceptions import AiotimerError as AiotimerError
    from ._exceptions import ClientNotConfiguredError as ClientNotConfiguredError
    from ._exceptions import NotEntitledError as NotEntitledError
    from ._exceptions import ProtocolError as ProtocolError
    from ._exceptions import ServerUnavailableError as ServerUnavailableError
    from ._expiry import ExpiredTimer as ExpiredTimer
    from ._expiry import Expiry as Expiry
    from ._expiry import Reaper as Reaper
    from ._heap import DeadlineHeap as DeadlineHeap
    from ._heap import Timer as Timer
    from ._incident import Incident as Incident
    from ._incidents import IncidentReaper as IncidentReaper
    from ._metrics import MetricsServer as MetricsServer
    from ._reapers import SignalReaper as SignalReaper
    from ._server import TimerServer as TimerServer
    from ._workers import Worker as Worker

# Imported on first use (PEP 562): a worker that only enters deadline blocks loads the
# client, the protocol and the validation, not the server (135 ms of imports).
_WHERE = {
    "PipeClient": "._client",
    "SocketClient": "._client",
    "TimerClient": "._client",
    "TimerScope": "._client",
    "configure": "._client",
    "expires": "._client",
    "get_client": "._client",
    "timer": "._client",
    "Clock": "._clock",
    "SystemClock": "._clock",
    "JsonEventLog": "._eventlog",
    "Event": "._events",
    "EventBus": "._events",
    "IncidentRecorded": "._events",
    "KillWorkerProcess": "._events",
    "LogEvent": "._events",
    "RequestRejected": "._events",
    "SignalSent": "._events",
    "Statistics": "._events",
    "TimerExpired": "._events",
    "WatchdogStarted": "._events",
    "WatchdogStopped": "._events",
    "WorkerExited": "._events",
    "AiotimerError": "._exceptions",
    "ClientNotConfiguredError": "._exceptions",
    "NotEntitledError": "._exceptions",
    "ProtocolError": "._exceptions",
    "ServerUnavailableError": "._exceptions",
    "ExpiredTimer": "._expiry",
    "Expiry": "._expiry",
    "Reaper": "._expiry",
    "DeadlineHeap": "._heap",
    "Timer": "._heap",
    "Incident": "._incident",
    "IncidentReaper": "._incidents",
    "MetricsServer": "._metrics",
    "SignalReaper": "._reapers",
    "TimerServer": "._server",
    "Worker": "._workers",
}

__version__ = "0.1.0"

__all__ = [
    # worker side
    "PipeClient",
    "SocketClient",
    "TimerClient",
    "TimerScope",
    "configure",
    "expires",
    "get_client",
    "timer",
    # launcher side
    "Clock",
    "SystemClock",
    "TimerServer",
    "Worker",
    # reaping
    "ExpiredTimer",
    "Expiry",
    "Reaper",
    "SignalReaper",
    "Incident",
    "IncidentReaper",
    # events and statistics
    "Event",
    "EventBus",
    "IncidentRecorded",
    "KillWorkerProcess",
    "LogEvent",
    "RequestRejected",
    "SignalSent",
    "Statistics",
    "TimerExpired",
    "WatchdogStarted",
    "WatchdogStopped",
    "WorkerExited",
    "JsonEventLog",
    "MetricsServer",
    # pure bookkeeping
    "DeadlineHeap",
    "Timer",
    # exceptions
    "AiotimerError",
    "ClientNotConfiguredError",
    "NotEntitledError",
    "ProtocolError",
    "ServerUnavailableError",
]


def __getattr__(name: str) -> object:
    """Import a public name's module on first use (PEP 562)."""
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'aiotimer' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
