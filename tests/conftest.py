"""Every async test runs on the default asyncio loop and on uvloop, as anyio's and uvloop's do."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import pytest

from aiotimer._loops import available_loops

pytest_plugins = ["aiotimer.pytest_plugin"]


def pytest_asyncio_loop_factories(config: Any, item: Any) -> Mapping[str, Any]:
    """Parametrise each async test over every loop we support."""
    return available_loops()


@pytest.fixture
def sleeper() -> Iterator[Callable[[], subprocess.Popen[bytes]]]:
    """Start idle child processes (real pids for tests); all are killed afterwards."""
    started: list[subprocess.Popen[bytes]] = []

    def start() -> subprocess.Popen[bytes]:
        proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        started.append(proc)
        return proc

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def python_worker(code: str) -> list[str]:
    """argv that runs ``code`` in a fresh interpreter with this checkout importable."""
    return [sys.executable, "-c", code]


@pytest.fixture(autouse=True)
def _no_inherited_aiotimer_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # Tests may themselves run under `aiotimer run`; a stray AIOTIMER_FD must not leak in.
    for name in [n for n in os.environ if n.startswith("AIOTIMER_")]:
        monkeypatch.delenv(name)


@pytest.fixture(scope="session")
def realtime_permitted() -> bool:
    """Whether this process may use SCHED_RR (tried on a throwaway thread)."""
    result: list[bool] = []

    def attempt() -> None:
        try:
            os.sched_setscheduler(0, os.SCHED_RR, os.sched_param(1))
        except PermissionError:
            result.append(False)
        else:
            result.append(True)

    thread = threading.Thread(target=attempt)
    thread.start()
    thread.join()
    return result[0]
