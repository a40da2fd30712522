"""Prometheus metrics and a health endpoint, served from a thread beside the watchdog's loop.

Nothing here is on the kill path: the server keeps plain counters (and
histogram buckets) as it works, and this exporter reads them when scraped
(``prometheus_client``'s custom collector).  ``/healthz`` asks the loop itself:
it answers 200 if the loop runs a callback within ``health_threshold``
seconds, 503 if it is blocked longer (or stopped), so a supervisor can restart
a wedged launcher.  It costs the loop nothing while nobody asks.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from ._events import logger
from ._ioplane import WARN_EVERY, run_blocking
from ._validate import check_seconds

if TYPE_CHECKING:
    from ._events import Counters

__all__ = ["MetricsServer"]

#: What the server hands the exporter: its counters and two gauges.
Source = Callable[[], tuple["Counters", int, int]]


class _QuietHandler(WSGIRequestHandler):
    #: Seconds a client may take to send its request or read the answer: a scraper
    #: that connects and stalls (or a port scan) does not keep a thread for ever.
    timeout = 5.0

    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes are not logged."""


class _BoundedServer(WSGIServer):
    """A thread per request, at most ``max_threads`` at once; over that, closed at once.

    socketserver's ``ThreadingMixIn`` starts a thread for every connection, so
    10,000 idle connections were 10,000 threads in the launcher.  A scraper
    that finds the server busy retries on its next interval.
    """

    max_threads = 8
    # socketserver's default backlog of 5 made a burst of connects wait seconds in
    # SYN retries, which a prober reads as "down".
    request_queue_size = 128

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._slots = threading.BoundedSemaphore(self.max_threads)
        #: connections closed unanswered because every thread was busy
        self.refused = 0
        self._next_warning = 0.0
        super().__init__(*args, **kwargs)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.refused += 1
            self.shutdown_request(request)
            now = time.monotonic()
            if now >= self._next_warning:
                self._next_warning = now + WARN_EVERY
                logger.warning(
                    "metrics: every one of %d threads is busy; refused %d connection(s) so far",
                    self.max_threads,
                    self.refused,
                )
            return
        thread = threading.Thread(
            target=self._serve, args=(request, client_address), name="aiotimer-metrics-request"
        )
        thread.daemon = True
        thread.start()

    def _serve(self, request: Any, client_address: Any) -> None:
        try:
            self.finish_request(request, client_address)
        except Exception:
            self.handle_error(request, client_address)
        finally:
            self.shutdown_request(request)
            self._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that timed out or went away is not worth a traceback on stderr."""


class _Collector:
    """Builds the metric families from the counters at scrape time."""

    def __init__(
        self,
        source: Source,
        workers: Callable[[], Mapping[str, int]] | None,
        restarts: Callable[[], int] | None,
    ) -> None:
        self._source = source
        self._workers = workers
        self._restarts = restarts

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        counters, active, watched = self._source()
        yield CounterMetricFamily(
            "aiotimer_requests", "Requests applied (acquire, release, hello)", counters.requests
        )
        rejected = CounterMetricFamily(
            "aiotimer_rejected", "Requests rejected, by reason", labels=["reason"]
        )
        for reason, count in sorted(dict(counters.rejected_by).items()):
            rejected.add_metric([reason], count)
        yield rejected
        yield CounterMetricFamily("aiotimer_expiries", "Timers that expired", counters.expiries)
        kills = CounterMetricFamily(
            "aiotimer_kills",
            "Signals the watchdog sent (escalations too), by signal",
            labels=["signal"],
        )
        for sig, count in sorted(dict(counters.kills_by_signal).items()):
            kills.add_metric([sig], count)
        yield kills
        yield CounterMetricFamily(
            "aiotimer_guard_kills",
            "Processes the guard SIGKILLed itself because the watchdog's loop did not answer",
            counters.guard_kills,
        )
        yield CounterMetricFamily(
            "aiotimer_restarts",
            "Ranks the launcher started again after a failure or a watchdog kill "
            "(a group restart of N ranks counts N)",
            self._restarts() if self._restarts else 0,
        )
        yield GaugeMetricFamily("aiotimer_active_timers", "Timers armed now", active)
        yield GaugeMetricFamily(
            "aiotimer_watched_processes", "Processes the watchdog watches now", watched
        )
        workers = GaugeMetricFamily("aiotimer_workers", "Workers, by state", labels=["state"])
        for state, count in sorted((self._workers() if self._workers else {}).items()):
            workers.add_metric([state], count)
        yield workers
        for name, text, hist in (
            (
                "aiotimer_decision_latency_seconds",
                "From a deadline to the first signal sent for it",
                counters.decision_hist,
            ),
            (
                "aiotimer_expiry_lag_seconds",
                "From a deadline to the watchdog handling it",
                counters.lag_hist,
            ),
        ):
            buckets = [
                ("+Inf" if le == float("inf") else repr(le), count)
                for le, count in hist.cumulative()
            ]
            yield HistogramMetricFamily(name, text, buckets=buckets, sum_value=hist.sum)


def _guard_line(counters: Counters) -> str:
    """What the guard did (see ``aiotimer._guard``), as a line of ``/healthz``; "" if nothing."""
    kills = counters.guard_kills
    if not kills:
        return ""
    return (
        f"the guard killed {kills} process{'' if kills == 1 else 'es'} because the loop "
        f"did not answer for {counters.guard_blocked_for:.1f}s\n"
    )


class MetricsServer:
    """Serves ``/metrics`` (Prometheus text) and ``/healthz`` on ``host:port`` (0: a free port).

    ``source()`` returns the server's counters, its active timers and its
    watched processes; ``workers()`` the launcher's workers by state;
    ``restarts()`` how many ranks it started again (``aiotimer_restarts_total``: a
    group restart of N ranks counts N).  ``loop`` is the watchdog's loop.
    """

    def __init__(
        self,
        source: Source,
        loop: asyncio.AbstractEventLoop,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        health_threshold: float = 1.0,
        workers: Callable[[], Mapping[str, int]] | None = None,
        restarts: Callable[[], int] | None = None,
    ) -> None:
        try:
            from prometheus_client import CollectorRegistry
        except ImportError:
            raise RuntimeError(
                "metrics need prometheus_client: pip install 'aiotimer[metrics]'"
            ) from None
        if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
            raise ValueError(f"`port` must be a port number (0 for any free one), got {port!r}")
        self.health_threshold = check_seconds("health_threshold", health_threshold)
        self._loop = loop
        self._source = source
        self._registry = CollectorRegistry(auto_describe=False)
        self._registry.register(_Collector(source, workers, restarts))
        self._http = make_server(
            host, port, self._app, server_class=_BoundedServer, handler_class=_QuietHandler
        )
        self.host = host
        self.port: int = self._http.server_address[1]
        self._thread = threading.Thread(
            target=self._http.serve_forever, name="aiotimer-metrics", daemon=True
        )
        self._thread.start()

    def __repr__(self) -> str:
        return f"<MetricsServer http://{self.host}:{self.port}/metrics>"

    @property
    def url(self) -> str:
        """Where the metrics are served."""
        return f"http://{self.host}:{self.port}/metrics"

    def healthy(self) -> tuple[bool, str]:
        """Whether the loop runs a callback within the threshold (call from another thread).

        If the guard ever killed processes for a blocked loop, a line says so:
        the status is the loop's now, the line what happened while it was not.
        """
        ok, text = self._loop_health()
        return ok, text + _guard_line(self._source()[0])

    def _loop_health(self) -> tuple[bool, str]:
        if self._loop.is_closed():
            return False, "the watchdog's loop has stopped\n"
        answered = threading.Event()
        try:
            self._loop.call_soon_threadsafe(answered.set)
        except RuntimeError:
            return False, "the watchdog's loop has stopped\n"
        if answered.wait(self.health_threshold):
            return True, "ok\n"
        return False, f"the watchdog's loop has been blocked for over {self.health_threshold:g}s\n"

    def _app(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

        path = environ.get("PATH_INFO", "/")
        if path == "/healthz":
            ok, text = self.healthy()
            status = "200 OK" if ok else "503 Service Unavailable"
            start_response(status, [("Content-Type", "text/plain; charset=utf-8")])
            return [text.encode()]
        if path in ("/", "/metrics"):
            body = generate_latest(self._registry)
            start_response("200 OK", [("Content-Type", CONTENT_TYPE_LATEST)])
            return [body]
        start_response("404 Not Found", [("Content-Type", "text/plain; charset=utf-8")])
        return [b"not found: try /metrics or /healthz\n"]

    def close(self) -> None:
        """Stop serving."""
        self._http.shutdown()
        self._http.server_close()
        self._thread.join(timeout=5)

    async def aclose(self) -> None:
        """``close()``, off the loop (for a server's listeners)."""
        await run_blocking(self.close)
