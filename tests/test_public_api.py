"""The public surface is pinned: a change to it must change this test too."""

import aiotimer
import aiotimer.testing
import aiotimer.transports

EXPECTED = {
    "AiotimerError",
    "ClientNotConfiguredError",
    "Clock",
    "DeadlineHeap",
    "Event",
    "EventBus",
    "ExpiredTimer",
    "Incident",
    "IncidentReaper",
    "IncidentRecorded",
    "JsonEventLog",
    "KillWorkerProcess",
    "MetricsServer",
    "NotEntitledError",
    "RequestRejected",
    "SignalSent",
    "TimerExpired",
    "WatchdogStarted",
    "WatchdogStopped",
    "WorkerExited",
    "Expiry",
    "LogEvent",
    "PipeClient",
    "ProtocolError",
    "Reaper",
    "ServerUnavailableError",
    "SignalReaper",
    "SocketClient",
    "Statistics",
    "SystemClock",
    "Timer",
    "TimerClient",
    "TimerScope",
    "TimerServer",
    "Worker",
    "configure",
    "expires",
    "get_client",
    "timer",
}


def test_all_is_pinned() -> None:
    assert set(aiotimer.__all__) == EXPECTED
    assert len(aiotimer.__all__) == len(EXPECTED)


def test_every_public_name_exists_and_is_documented() -> None:
    for module in (aiotimer, aiotimer.testing, aiotimer.transports):
        for name in module.__all__:
            obj = getattr(module, name)
            if callable(obj) and not isinstance(obj, type(aiotimer.Reaper)):
                assert obj.__doc__, f"{module.__name__}.{name} has no docstring"


def test_public_objects_live_in_private_modules() -> None:
    assert aiotimer.TimerServer.__module__ == "aiotimer._server"
    assert aiotimer.expires.__module__ == "aiotimer._client"


def test_exception_families_share_one_root() -> None:
    for name in (
        "ClientNotConfiguredError",
        "NotEntitledError",
        "ProtocolError",
        "ServerUnavailableError",
    ):
        assert issubclass(getattr(aiotimer, name), aiotimer.AiotimerError)
    # torch raises these builtins in the same situations; callers catching them keep working.
    assert issubclass(aiotimer.ClientNotConfiguredError, RuntimeError)
    assert issubclass(aiotimer.ServerUnavailableError, BrokenPipeError)
    assert issubclass(aiotimer.ProtocolError, ValueError)
    assert issubclass(aiotimer.NotEntitledError, PermissionError)


def test_package_ships_py_typed() -> None:
    from importlib.resources import files

    assert files("aiotimer").joinpath("py.typed").is_file()


def test_the_client_side_imports_no_server_module() -> None:
    """A worker that only enters deadline blocks pays for the client, not the server."""
    import subprocess
    import sys

    code = (
        "import sys; import aiotimer; aiotimer.expires; aiotimer.timer; "
        "aiotimer.ServerUnavailableError; print(' '.join(sorted(sys.modules)))"
    )
    loaded = set(
        subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True
        ).stdout.split()
    )
    ours = {m for m in loaded if m.startswith("aiotimer")}
    assert ours == {
        "aiotimer",
        "aiotimer._client",
        "aiotimer._exceptions",
        "aiotimer._protocol",
        "aiotimer._validate",
    }
    assert not loaded & {"asyncio.subprocess", "multiprocessing", "aiotimer.transports"}


def test_every_public_name_resolves_lazily() -> None:
    for name in aiotimer.__all__:
        assert getattr(aiotimer, name) is not None
    assert set(aiotimer.__all__) <= set(dir(aiotimer))
