"""The metrics server under hostile scrapers: bounded threads, stalled clients dropped."""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import urllib.request

import pytest

from aiotimer import TimerServer
from aiotimer._metrics import _BoundedServer, _QuietHandler

pytest.importorskip("prometheus_client")


def _get(url: str) -> int:
    with urllib.request.urlopen(url, timeout=30) as response:
        status: int = response.status
        return status


def _request_threads() -> int:
    return sum(1 for t in threading.enumerate() if t.name == "aiotimer-metrics-request")


@pytest.mark.slow
async def test_idle_connections_cost_a_bounded_number_of_threads_and_are_refused_and_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, "aiotimer")
    async with TimerServer() as server:
        metrics = server.serve_metrics()
        idle: list[socket.socket] = []
        try:
            for _ in range(200):  # connect and never send a byte
                idle.append(
                    await asyncio.to_thread(socket.create_connection, ("127.0.0.1", metrics.port))
                )
            await asyncio.sleep(0.5)
            assert _request_threads() <= _BoundedServer.max_threads
            # Answers again once the idle ones go; the refused were counted.
            for sock in idle:
                sock.close()
            idle.clear()
            status = await asyncio.to_thread(_get, metrics.url.replace("/metrics", "/healthz"))
            assert status == 200
        finally:
            for sock in idle:
                sock.close()
        http = metrics._http
        assert isinstance(http, _BoundedServer) and http.refused >= 200 - http.max_threads
        refusals = [r for r in caplog.records if "threads is busy" in r.getMessage()]
        assert len(refusals) == 1  # one line per 10 s, not one per connection


@pytest.mark.slow
async def test_a_client_that_stalls_is_dropped_after_the_request_timeout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_QuietHandler, "timeout", 0.3)
    async with TimerServer() as server:
        metrics = server.serve_metrics()
        with socket.create_connection(("127.0.0.1", metrics.port)) as stalled:
            stalled.settimeout(30)
            stalled.sendall(b"GET /metrics HTTP/1.1\r\n")  # and never the rest
            # The server gives up on it: the connection is closed from its end.
            assert await asyncio.to_thread(stalled.recv, 1024) == b""
        assert await asyncio.to_thread(_get, metrics.url) == 200
