"""The ``aiotimer`` command: argument parsing and ``main()``; the jobs live in ``launcher``.

Errors are one line and an exit status, never a traceback: 2 for usage errors.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, Literal, NoReturn

from ._incidents import DEFAULT_DUMP_TIMEOUT, IncidentReaper
from ._ioplane import SinkHandler, StreamSink
from ._loops import loop_factory, pidfd_child_watcher
from ._reapers import SignalReaper
from ._recorder import DEFAULT_MAX_INCIDENTS
from ._validate import check_seconds, check_signal
from .launcher import EXIT_USAGE, Job, Output, UsageError, serve_command

__all__ = ["build_parser", "main"]

_EXIT_CODES = """\
exit status:
  0    every rank succeeded
  1    a rank failed on its own (exit status != 0, no watchdog expiry)
  2    usage error (a missing or non-executable program included)
  124  the last attempt ended with a watchdog expiry (even if the worker then exited 0)
  128+n  the launcher was stopped by signal n (SIGTERM: 143, SIGINT: 130, ...)
  141  its stdout was closed (| head): the job is stopped quietly
"""


class _Parser(argparse.ArgumentParser):
    """Usage errors on one line, naming the subcommand, and exit 2."""

    #: the subcommands' parsers, by name
    subcommands: dict[str, argparse.ArgumentParser]

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _count(name: str, minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{name} must be >= {minimum}, got {value}")
        return value

    return parse


def _port(name: str) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = -1
        if not 0 <= value <= 65535:
            raise argparse.ArgumentTypeError(
                f"{name} must be a port number, 0-65535 (0: any free port), got {text!r}"
            )
        return value

    return parse


def _check_metrics_installed() -> None:
    """``UsageError`` (one line, exit 2) if ``--metrics-port`` was given without prometheus_client.

    Checked at start: the job has not started when it fails.
    """
    try:
        import prometheus_client  # noqa: F401
    except ImportError as exc:
        raise UsageError(
            f"--metrics-port needs prometheus_client ({exc}): pip install 'aiotimer[metrics]'"
        ) from None


def _nnodes(text: str) -> int:
    """torchrun's ``--nnodes``: ``N`` or ``MIN:MAX``; ``aiotimer run`` takes one node only."""
    parts = text.split(":")
    try:
        low, high = int(parts[0]), int(parts[-1])
    except ValueError:
        low = high = 0
    if len(parts) > 2 or not 0 < low <= high:
        raise argparse.ArgumentTypeError(
            f"--nnodes must be N or MIN:MAX with 0 < MIN <= MAX, got {text!r}"
        )
    if high > 1:
        raise argparse.ArgumentTypeError(
            f"aiotimer run starts every rank on this host, got --nnodes {text}; for a "
            f"multi-node job, watch torchrun's ranks on each node: aiotimer serve -- "
            f"torchrun --nnodes {text} ..."
        )
    return 1


def _run_id(text: str) -> str:
    """``--run-id``: any printable text, as torchrun's ``--rdzv-id`` (never empty)."""
    if not text or not text.isprintable():
        raise argparse.ArgumentTypeError(
            f"--run-id must be a non-empty printable string, got {text!r}"
        )
    return text


def _signal_arg(text: str) -> signal.Signals:
    try:
        return check_signal("--signal", text)
    except (TypeError, ValueError) as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _seconds(name: str) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"`{name}` must be a number, got {text!r}") from None
        try:
            return check_seconds(name, value, allow_zero=True)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return parse


def _bench(argv: list[str]) -> int:
    """``aiotimer bench ...``: the harness lives in the checkout's ``benchmarks`` package."""
    import importlib

    sys.path.insert(0, os.getcwd())
    try:
        harness: Any = importlib.import_module("benchmarks.__main__")
    except ImportError:
        print(
            "aiotimer bench: the benchmark harness ships with the source checkout; run this "
            "from its top directory (or: python -m benchmarks)",
            file=sys.stderr,
        )
        return EXIT_USAGE
    return int(harness.main(argv))


def _add_reaper_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--signal",
        type=_signal_arg,
        default=signal.SIGKILL,
        help="signal sent on expiry (default KILL; a torch client's own signal wins)",
    )
    parser.add_argument(
        "--grace",
        type=_seconds("--grace"),
        default=5.0,
        help="seconds between --signal and SIGKILL (default 5)",
    )
    parser.add_argument(
        "--incident-dir",
        default="aiotimer-incidents",
        help="where each expiry's incident (stacks, actions) is written as JSON and text "
        "(default ./aiotimer-incidents)",
    )
    parser.add_argument(
        "--dump-timeout",
        type=_seconds("--dump-timeout"),
        default=DEFAULT_DUMP_TIMEOUT,
        help="seconds after a deadline by which the kill goes out, stacks captured or not "
        f"(default {DEFAULT_DUMP_TIMEOUT:g}: py-spy on a torch worker takes 1-4 s on busy "
        "cores; the kill goes out as soon as the stacks are in; 0: no stack capture)",
    )
    parser.add_argument(
        "--max-incidents",
        type=_count("--max-incidents", 0),
        default=DEFAULT_MAX_INCIDENTS,
        help="incidents the --incident-dir keeps; the oldest of ours go first, with a warning "
        f"(default {DEFAULT_MAX_INCIDENTS}; 0: no bound)",
    )
    parser.add_argument(
        "--observe",
        action="store_true",
        help="record incidents and report expiries, but send no signal (to roll out deadlines)",
    )
    parser.add_argument(
        "--event-log",
        default=None,
        help="append every event to FILE as one JSON object per line",
    )
    parser.add_argument(
        "--metrics-port",
        type=_port("--metrics-port"),
        default=None,
        help="serve Prometheus metrics and /healthz on this port (0: any free port, printed)",
    )
    parser.add_argument(
        "--metrics-host",
        default="127.0.0.1",
        help="address to serve metrics on (default 127.0.0.1)",
    )
    parser.add_argument(
        "--metrics-linger",
        type=_seconds("--metrics-linger"),
        default=0.0,
        metavar="S",
        help="keep /metrics and /healthz up S seconds after the job ends, so that a scraper "
        "sees how it ended (the last kill, the restarts): at least twice the scrape interval "
        "(default 0; a stop signal ends it early)",
    )
    parser.add_argument(
        "--realtime",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="run the timer server real-time (SCHED_RR) near deadlines, so busy workers cannot "
        "delay a kill (default: where permitted, i.e. with CAP_SYS_NICE or `ulimit -r` >= 1; "
        "--realtime warns if it is not)",
    )
    parser.add_argument(
        "--cgroup",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="run each rank's attempt (serve: the command) in a cgroup v2 of its own, ended "
        "with cgroup.kill, so nothing it started outlives it (default: where permitted, as "
        "root or with a delegated cgroup; else process groups and the job token)",
    )
    parser.add_argument(
        "--dump-stacks",
        action="store_true",
        help="(deprecated: every expiry's stacks are captured into its incident)",
    )
    parser.add_argument(
        "--log-level",
        default="WARNING",
        type=str.upper,
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="level of aiotimer's own log on stderr (default warning; any case)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The ``aiotimer`` argument parser."""
    from . import __version__

    parser = _Parser(
        prog="aiotimer", description="asyncio watchdog timers for training and job launchers"
    )
    parser.add_argument("--version", action="version", version=f"aiotimer {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    run = sub.add_parser(
        "run",
        help="run N watched copies of a command",
        usage="aiotimer run [-n N] [--max-restarts R] [--restart-policy {group,rank}] "
        "[--stop-grace S] [--log-dir DIR] [--run-id ID] [--standalone] [--nnodes 1] "
        "[--signal SIG] [--grace S] [--incident-dir DIR] [--dump-timeout S] "
        "[--max-incidents N] [--observe] [--event-log FILE] [--metrics-port PORT] "
        "[--metrics-host HOST] [--metrics-linger S] [--[no-]realtime] [--[no-]cgroup] "
        "[--log-level LEVEL] "
        "-- CMD [ARGS...]",
        description="Run N copies of CMD as watched workers, with torchrun's environment "
        "(RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, TORCHELASTIC_RUN_ID, "
        "TORCHELASTIC_ERROR_FILE, ...); kill a worker whose aiotimer.expires()/timer() block "
        "overruns, and restart the group. The summary ends with the root cause: the first "
        "failure, with its error (torch's @record) or where it hung.",
        epilog=_EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument(
        "-n",
        "--nproc-per-node",
        "--nproc_per_node",
        "--nprocs",
        dest="nprocs",
        type=_count("-n", 1),
        default=1,
        help="copies (ranks) to run (default 1)",
    )
    run.add_argument(
        "--max-restarts",
        "--max_restarts",
        dest="max_restarts",
        type=_count("--max-restarts", 0),
        default=0,
        help="restarts after a failure or a watchdog kill (default 0)",
    )
    run.add_argument(
        "--restart-policy",
        choices=["group", "rank"],
        default="group",
        help="group: stop and restart every rank, as torchrun (default); "
        "rank: restart only a rank the watchdog killed",
    )
    run.add_argument(
        "--stop-grace",
        type=_seconds("--stop-grace"),
        default=10.0,
        help="seconds between SIGTERM and SIGKILL when stopping the ranks (default 10)",
    )
    run.add_argument(
        "--log-dir",
        "--log_dir",
        dest="log_dir",
        default=None,
        help="also write each rank's output to DIR/attempt_K/RANK/{stdout,stderr}.log; its "
        "TORCHELASTIC_ERROR_FILE is DIR/attempt_K/RANK/error.json (default: in a private "
        "temporary directory, kept only if an error file was written in it)",
    )
    run.add_argument(
        "--run-id",
        "--run_id",
        dest="run_id",
        type=_run_id,
        default=None,
        help="every rank's TORCHELASTIC_RUN_ID (default: a new uuid, as torchrun --standalone)",
    )
    run.add_argument(
        "--standalone",
        action="store_true",
        help="accepted for torchrun's command lines; a no-op: aiotimer run is single-host",
    )
    run.add_argument(
        "--nnodes",
        type=_nnodes,
        default=1,
        help="1 or 1:1, for torchrun's command lines; for more nodes use "
        "aiotimer serve -- torchrun ...",
    )
    _add_reaper_options(run)
    run.add_argument("cmd", nargs=argparse.REMAINDER, help="-- CMD [ARGS...]")

    serve = sub.add_parser(
        "serve",
        help="serve torch FileTimerClients on a FIFO while a command (torchrun) runs",
        usage="aiotimer serve [--fifo PATH] [--root PID] [--signal SIG] [--grace S] "
        "[--incident-dir DIR] [--dump-timeout S] [--max-incidents N] [--observe] "
        "[--event-log FILE] "
        "[--metrics-port PORT] [--metrics-host HOST] [--metrics-linger S] [--[no-]realtime] "
        "[--[no-]cgroup] [--log-level LEVEL] -- CMD [ARGS...]",
        description="Create a FIFO, serve torch's FileTimerClient requests on it, and run "
        "CMD with TORCHELASTIC_TIMER_FILE set to it (torchrun passes it to its workers); "
        "aiotimer's own expires/timer in CMD's processes connect to a socket, named in "
        "AIOTIMER_SOCKET. Exits with CMD's status.",
    )
    serve.add_argument(
        "--fifo", default=None, help="FIFO path (default: a new one in the temporary directory)"
    )
    serve.add_argument(
        "--root",
        type=_count("--root", 1),
        action="append",
        default=[],
        help="also accept requests for descendants of this pid (repeatable)",
    )
    _add_reaper_options(serve)
    serve.add_argument("cmd", nargs=argparse.REMAINDER, help="-- CMD [ARGS...]")

    sub.add_parser(
        "bench",
        help="run the benchmark harness (from a source checkout): aiotimer bench --help",
        add_help=False,
    )
    parser.subcommands = {"run": run, "serve": serve}
    return parser


class _NotShownAsEvent(logging.Filter):
    """Drops log records that repeat an event the launcher prints itself.

    Those are marked ``aiotimer_event`` (``EVENT_LOGGED``).
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(record, "aiotimer_event", False)


def _configure_logging(level: str, *, events_printed: bool, sink: StreamSink) -> None:
    # Through a writer thread: a stalled terminal holds back log lines, never a kill.
    handler = SinkHandler(sink)
    handler.setFormatter(logging.Formatter("aiotimer %(levelname)s: %(message)s"))
    if events_printed:
        handler.addFilter(_NotShownAsEvent())
    log = logging.getLogger("aiotimer")
    log.addHandler(handler)
    log.setLevel(level)


def _check_writable_dir(path: str, flag: str) -> None:
    """``UsageError`` (one line, exit 2) unless files can be made in ``path`` (or it can be made).

    Checked at start, so a mistake costs one line now rather than the stacks
    or the output of the first hang; a disk that fills later costs a warning
    and the data, never the job.
    """
    target = os.path.abspath(path)
    if os.path.exists(target):
        if not os.path.isdir(target):
            raise UsageError(f"{flag} {path}: not a directory")
        try:
            fd, probe = tempfile.mkstemp(dir=target, prefix=".aiotimer-probe-")
        except OSError as exc:
            raise UsageError(f"{flag} {path}: cannot write there ({exc.strerror})") from None
        os.close(fd)
        os.unlink(probe)
        return
    parent = os.path.dirname(target)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {path}: cannot create it ({parent} is not writable)")


def _realtime(flag: bool | None) -> bool | Literal["auto"]:
    """``--realtime``/``--no-realtime``, or neither: on where permitted."""
    return "auto" if flag is None else flag


def _run(coro: Coroutine[Any, Any, int]) -> int:
    async def on_own_loop() -> int:
        async with pidfd_child_watcher():  # the CLI owns its loop: no thread per child
            return await coro

    try:
        factory = loop_factory()
    except ValueError as exc:
        coro.close()  # never to run: no "coroutine was never awaited" after the error
        raise UsageError(str(exc)) from None
    # Everything imported so far lives as long as the process: a full garbage
    # collection need not walk it again, so its pauses (which hold the loop,
    # and a kill with it) stay as short as the launcher's own garbage.
    gc.freeze()
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(on_own_loop())


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``aiotimer`` command; returns the exit status."""
    parser = build_parser()
    assert isinstance(parser, _Parser)
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:
        return _bench(argv[1:])
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # by the parser of the part they were given to: `aiotimer run: error: ...`
        before = argv[: argv.index(args.command)]
        owner = parser if set(unknown) & set(before) else parser.subcommands[args.command]
        owner.error(f"unrecognized arguments: {' '.join(unknown)}")
    cmd = list(args.cmd)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    sub = parser.subcommands[args.command]
    if not cmd:
        sub.error("a command to run is required after --")
    if args.dump_stacks:
        print(
            f"{sub.prog}: --dump-stacks is no longer needed: every expiry's stacks are captured "
            f"into its incident in {args.incident_dir}/ (--dump-timeout 0 turns capture off)",
            file=sys.stderr,
        )
    try:
        if args.dump_timeout > 0 or args.incident_dir != "aiotimer-incidents":
            _check_writable_dir(args.incident_dir, "--incident-dir")
        if getattr(args, "log_dir", None):
            _check_writable_dir(args.log_dir, "--log-dir")
        if args.event_log:
            _check_writable_dir(os.path.dirname(os.path.abspath(args.event_log)), "--event-log")
        if args.metrics_port is not None:
            _check_metrics_installed()
        elif args.metrics_linger:
            raise UsageError("--metrics-linger needs --metrics-port")
    except UsageError as exc:
        sub.exit(EXIT_USAGE, f"{sub.prog}: error: {exc}\n")
    reaper = IncidentReaper(
        args.incident_dir,
        kill=SignalReaper(args.signal, grace=args.grace),
        dump_timeout=args.dump_timeout,
        observe=args.observe,
        max_incidents=args.max_incidents or None,
    )
    try:
        if args.command == "serve":
            err = StreamSink("stderr", sys.stderr.buffer)
            _configure_logging(args.log_level, events_printed=True, sink=err)
            # The default FIFO goes in a fresh 0700 directory: a fixed name in /tmp
            # could be taken (or swapped) first by any user.
            private = None if args.fifo else tempfile.mkdtemp(prefix="aiotimer-")
            fifo = args.fifo if private is None else os.path.join(private, "timer.fifo")
            try:
                served = _run(
                    serve_command(
                        cmd,
                        fifo=fifo,
                        roots=args.root,
                        reaper=reaper,
                        event_log=args.event_log,
                        metrics_port=args.metrics_port,
                        metrics_host=args.metrics_host,
                        metrics_linger=args.metrics_linger,
                        realtime=_realtime(args.realtime),
                        cgroup=args.cgroup,
                    )
                )
            finally:
                if private is not None:  # with whatever was moved aside in it
                    shutil.rmtree(private, ignore_errors=True)
            err.close()
            return served
        output = Output(sys.stdout.buffer, sys.stderr.buffer)
        _configure_logging(args.log_level, events_printed=True, sink=output.err)
        job = Job(
            cmd,
            nprocs=args.nprocs,
            max_restarts=args.max_restarts,
            restart_policy=args.restart_policy,
            reaper=reaper,
            stop_grace=args.stop_grace,
            log_dir=args.log_dir,
            event_log=args.event_log,
            metrics_port=args.metrics_port,
            metrics_host=args.metrics_host,
            metrics_linger=args.metrics_linger,
            realtime=_realtime(args.realtime),
            cgroup=args.cgroup,
            output=output,
            run_id=args.run_id,
        )
        status = _run(job.run())
        if job.output.closed:
            # Nothing more reaches a closed stdout: not even the interpreter's last flush.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return status
    except UsageError as exc:
        sub.exit(EXIT_USAGE, f"{sub.prog}: error: {exc}\n")
    except KeyboardInterrupt:  # before the job's own handlers were in place
        return 128 + signal.SIGINT


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
