"""Command line: ``aiotimer run -n N -- CMD ...`` runs N watched copies of CMD."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
import tempfile
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from ._loops import loop_factory, pidfd_child_watcher
from ._reapers import SignalReaper
from ._validate import check_seconds, check_signal
from .launcher import run_job, serve_command

__all__ = ["build_parser", "main"]


def _positive_int(name: str) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer, got {text!r}") from None
        if value < 0 or (name == "-n" and value == 0):
            bound = ">= 1" if name == "-n" else ">= 0"
            raise argparse.ArgumentTypeError(f"{name} must be {bound}, got {value}")
        return value

    return parse


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
        return 2
    return int(harness.main(argv))


def build_parser() -> argparse.ArgumentParser:
    """The ``aiotimer`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="aiotimer", description="asyncio watchdog timers for training and job launchers"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser(
        "run",
        help="run N watched copies of a command",
        description="Run N copies of CMD as watched workers; kill a worker whose "
        "aiotimer.expires()/timer() block overruns, and restart it.",
    )
    run.add_argument("-n", "--nprocs", type=_positive_int("-n"), default=1, help="copies to run")
    run.add_argument(
        "--max-restarts",
        type=_positive_int("--max-restarts"),
        default=0,
        help="restarts of a rank after a watchdog kill (default 0)",
    )
    _add_reaper_options(run)
    run.add_argument("cmd", nargs=argparse.REMAINDER, help="-- CMD [ARGS...]")

    serve = sub.add_parser(
        "serve",
        help="serve torch FileTimerClients on a FIFO while a command (torchrun) runs",
        description="Create a FIFO, serve torch's FileTimerClient requests on it, and run "
        "CMD with TORCHELASTIC_TIMER_FILE set to it (torchrun passes it to its workers). "
        "Exits with CMD's status.",
    )
    serve.add_argument(
        "--fifo",
        default=None,
        help="FIFO path (default: a new one in the temporary directory)",
    )
    serve.add_argument(
        "--root",
        type=_positive_int("--root"),
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
    return parser


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
        "--dump-stacks", action="store_true", help="print the hung worker's Python stacks first"
    )
    parser.add_argument(
        "--log-level",
        default="WARNING",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="level of aiotimer's own log on stderr (default WARNING)",
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``aiotimer`` command."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:
        return _bench(argv[1:])
    args = parser.parse_args(argv)
    cmd = list(args.cmd)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    if not cmd:
        parser.error("a command to run is required after --")
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("aiotimer %(levelname)s: %(message)s"))
    log = logging.getLogger("aiotimer")
    log.addHandler(handler)
    log.setLevel(args.log_level)
    reaper = SignalReaper(args.signal, grace=args.grace, dump_stacks=args.dump_stacks)
    coro: Coroutine[Any, Any, int]
    if args.command == "serve":
        fifo = args.fifo or os.path.join(tempfile.gettempdir(), f"aiotimer-{os.getpid()}.fifo")
        coro = serve_command(cmd, fifo=fifo, roots=args.root, reaper=reaper)
    else:
        coro = run_job(cmd, nprocs=args.nprocs, max_restarts=args.max_restarts, reaper=reaper)
    factory = loop_factory()

    async def on_own_loop() -> int:
        async with pidfd_child_watcher():  # the CLI owns its loop: no thread per child
            return await coro

    try:
        with asyncio.Runner(loop_factory=factory) as runner:
            return runner.run(on_own_loop())
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
