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
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

from ._events import KILL_WORKER_PROCESS, TIMER_EXPIRED
from ._reap import SignalReaper
from ._server import TimerServer
from ._validate import check_seconds, check_signal
from ._workers import pidfd_child_watcher

__all__ = ["main", "run_job", "serve_command"]

#: ``aiotimer run`` exit status when a worker was still hanging after its last restart.
EXIT_WATCHDOG = 124
#: ``aiotimer run`` exit status when a worker failed on its own.
EXIT_WORKER_FAILED = 1


def _loop_factory() -> type[asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.Loop


@dataclass
class RankResult:
    """How one rank of ``aiotimer run`` ended."""

    rank: int
    returncode: int | None = None
    attempts: int = 0
    watchdog_kills: list[str] = field(default_factory=list)

    def describe(self) -> str:
        """One line for the summary."""
        restarts = self.attempts - 1
        tail = f" after {restarts} restart{'s' if restarts != 1 else ''}" if restarts else ""
        kills = f"; watchdog kills: {'; '.join(self.watchdog_kills)}" if self.watchdog_kills else ""
        if self.returncode == 0:
            return f"rank {self.rank}: ok{tail}{kills}"
        if self.returncode is not None and self.returncode < 0:
            name = signal.Signals(-self.returncode).name
            status = f"killed by {name}"
        else:
            status = f"exit status {self.returncode}"
        return f"rank {self.rank}: FAILED, {status}{tail}{kills}"


class _Printer:
    """Prints worker output with a rank prefix, and the watchdog's actions as they happen."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.ranks: dict[int, int] = {}

    def line(self, text: str) -> None:
        self.out.write(text if text.endswith("\n") else text + "\n")
        self.out.flush()

    def who(self, pid: object) -> str:
        rank = self.ranks.get(pid) if isinstance(pid, int) else None
        return f"rank {rank} (pid {pid})" if rank is not None else f"pid {pid}"

    def event(self, name: str, info: Mapping[str, object]) -> None:
        if name == TIMER_EXPIRED:
            lag = info.get("lag")
            late = f"{lag * 1e3:.2f} ms" if isinstance(lag, float) else "?"
            self.line(
                f"aiotimer: {self.who(info.get('pid'))}: timer {info.get('scope')!r} "
                f"expired ({late} after its deadline)"
            )
        elif name == KILL_WORKER_PROCESS:
            sig = info.get("signal")
            sig_name = signal.Signals(sig).name if isinstance(sig, int) and sig > 0 else str(sig)
            latency = info.get("latency")
            late = f"{latency * 1e3:.2f} ms" if isinstance(latency, float) else "?"
            self.line(
                f"aiotimer: sent {sig_name} to {self.who(info.get('pid'))} "
                f"({late} after the deadline)"
            )

    async def pump(self, stream: asyncio.StreamReader | None, prefix: str) -> None:
        if stream is None:
            return
        while line := await stream.readline():
            self.line(prefix + line.decode(errors="replace"))


async def run_job(
    command: Sequence[str],
    *,
    nprocs: int = 1,
    max_restarts: int = 0,
    reaper: SignalReaper | None = None,
    out: TextIO | None = None,
) -> int:
    """Run ``nprocs`` watched copies of ``command``; return the job's exit status.

    Each copy gets ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``LOCAL_WORLD_SIZE``
    and ``AIOTIMER_RESTART_COUNT`` as torchrun would set them.  A copy killed by
    the watchdog is restarted up to ``max_restarts`` times.  Returns 0 when every
    rank succeeded, 124 when one was still hanging after its last restart, and
    1 when one failed on its own.
    """
    if not command:
        raise ValueError("`command` must name a program to run, got an empty command")
    printer = _Printer(sys.stdout if out is None else out)
    results = [RankResult(rank) for rank in range(nprocs)]

    async with TimerServer(reaper=reaper, log_event=printer.event) as server:

        async def run_rank(result: RankResult) -> None:
            rank = result.rank
            while True:
                env = dict(os.environ)
                env.update(
                    RANK=str(rank),
                    LOCAL_RANK=str(rank),
                    WORLD_SIZE=str(nprocs),
                    LOCAL_WORLD_SIZE=str(nprocs),
                    AIOTIMER_RESTART_COUNT=str(result.attempts),
                    PYTHONUNBUFFERED="1",
                )
                worker = await server.spawn(
                    command[0],
                    *command[1:],
                    env=env,
                    stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.PIPE,
                )
                printer.ranks[worker.pid] = rank
                result.attempts += 1
                prefix = f"[rank{rank}]: "
                await asyncio.gather(
                    printer.pump(worker.stdout, prefix), printer.pump(worker.stderr, prefix)
                )
                result.returncode = await worker.wait()
                if worker.killed_by_watchdog:
                    result.watchdog_kills.append(
                        f"attempt {result.attempts - 1} in {', '.join(worker.expired_scopes)}"
                    )
                    if result.attempts <= max_restarts:
                        printer.line(
                            f"aiotimer: restarting rank {rank} "
                            f"(restart {result.attempts} of {max_restarts})"
                        )
                        continue
                return

        await asyncio.gather(*(run_rank(r) for r in results))

    printer.line("aiotimer: summary")
    for result in results:
        printer.line("  " + result.describe())
    if any(r.returncode != 0 and r.watchdog_kills for r in results):
        return EXIT_WATCHDOG
    if any(r.returncode != 0 for r in results):
        return EXIT_WORKER_FAILED
    return 0


async def serve_command(
    command: Sequence[str],
    *,
    fifo: str,
    roots: Sequence[int] = (),
    reaper: SignalReaper | None = None,
) -> int:
    """Serve torch timer clients on ``fifo`` while ``command`` runs; return its exit status.

    ``command`` (torchrun, typically) gets ``TORCHELASTIC_TIMER_FILE=fifo``, which
    torchrun hands on to every worker, so workers that use torch's own
    ``FileTimerClient`` are served by aiotimer.  SIGINT and SIGTERM are passed
    on to the command.
    """
    from .transports.fifo import listen_fifo

    if not command:
        raise ValueError("`command` must name a program to run, got an empty command")
    async with TimerServer(reaper=reaper) as server:
        await listen_fifo(server, fifo, roots=roots)
        env = dict(os.environ)
        env["TORCHELASTIC_TIMER_FILE"] = fifo
        child = await server.spawn(command[0], *command[1:], env=env)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, child.send_signal, sig)
        try:
            returncode = await child.wait()
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
    return returncode if returncode >= 0 else 128 - returncode


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
    factory = _loop_factory()

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
