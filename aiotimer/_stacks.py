"""Capturing a live process's stacks: py-spy from outside, faulthandler from inside.

``py-spy dump --pid P --native --json`` reads any Python process's stacks
(native frames included) without its cooperation, given ptrace rights: same
user, and ``kernel.yama.ptrace_scope`` <= 1 or ``CAP_SYS_PTRACE``.  It briefly
pauses the target, which is about to be killed anyway.  Where py-spy is
missing or not allowed, an aiotimer client that registered a stack-dump signal
is asked to write its Python stacks (``faulthandler``) into a file the server
gave it.  Whatever happens, a capture ends by its deadline and says why it
found nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ._protocol import dump_file_name

__all__ = [
    "ENV_PY_SPY",
    "Frame",
    "Stacks",
    "Thread",
    "capture_stacks",
    "dump_file",
    "find_py_spy",
    "parse_faulthandler",
]

#: Environment variable: the py-spy binary to use ("" disables py-spy).
ENV_PY_SPY = "AIOTIMER_PY_SPY"


@dataclass(frozen=True)
class Frame:
    """One frame: its function, file and line (0 for a native frame without one)."""

    function: str
    file: str
    line: int
    native: bool = False


@dataclass(frozen=True)
class Thread:
    """One thread's stack, innermost frame first."""

    id: int
    name: str | None
    frames: tuple[Frame, ...]
    active: bool = False


@dataclass
class Stacks:
    """What a capture found: threads, or the reason there are none."""

    pid: int
    method: str | None = None  # "py-spy" or "faulthandler"
    threads: list[Thread] = field(default_factory=list)
    raw: str = ""
    reason: str | None = None  # why there are no stacks, or why the first method failed
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        """Whether any stack was captured."""
        return bool(self.threads) or bool(self.raw)

    def top(self) -> Frame | None:
        """The innermost Python frame of the first thread (the likeliest place it hangs)."""
        for thread in self.threads:
            for frame in thread.frames:
                if not frame.native:
                    return frame
        return None

    def to_dict(self) -> dict[str, object]:
        """The capture as plain data (for the incident's JSON)."""
        return {
            "pid": self.pid,
            "method": self.method,
            "seconds": round(self.seconds, 6),
            "reason": self.reason,
            "threads": [
                {
                    "id": t.id,
                    "name": t.name,
                    "active": t.active,
                    "frames": [
                        {"function": f.function, "file": f.file, "line": f.line, "native": f.native}
                        for f in t.frames
                    ],
                }
                for t in self.threads
            ],
            "raw": self.raw,
        }


def find_py_spy() -> str | None:
    """The py-spy binary: ``AIOTIMER_PY_SPY`` if set ("" for none), else the one on PATH."""
    configured = os.environ.get(ENV_PY_SPY)
    if configured is not None:
        return configured or None
    return shutil.which("py-spy")


def _format(threads: list[Thread]) -> str:
    lines: list[str] = []
    for t in threads:
        lines.append(
            f"Thread {t.id}{f' ({t.name})' if t.name else ''}{' (active)' if t.active else ''}"
        )
        for f in t.frames:
            where = f"{f.file}:{f.line}" if f.line else f.file
            lines.append(f"    {f.function} ({where})")
    return "\n".join(lines) + "\n"


def _from_py_spy(data: object) -> list[Thread]:
    threads: list[Thread] = []
    if not isinstance(data, list):
        return threads
    for item in data:
        if not isinstance(item, dict):
            continue
        frames = []
        for f in item.get("frames") or ():
            if not isinstance(f, dict):
                continue
            filename = str(f.get("filename") or "?")
            native = (
                bool(f.get("module")) or filename.endswith((".so", ".so.6")) or ".so." in filename
            )
            frames.append(
                Frame(str(f.get("name") or "?"), filename, int(f.get("line") or 0), native)
            )
        threads.append(
            Thread(
                int(item.get("os_thread_id") or item.get("thread_id") or 0),
                item.get("thread_name") if isinstance(item.get("thread_name"), str) else None,
                tuple(frames),
                bool(item.get("active")),
            )
        )
    return threads


async def _py_spy(binary: str, pid: int, timeout: float, native: bool) -> tuple[list[Thread], str]:
    argv = [binary, "dump", "--pid", str(pid), "--json"]
    if native:
        argv.append("--native")
    # A session of its own, so that what it started goes with it on a timeout.
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        start_new_session=True,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        # Read its pipes to their end as well as waiting: on uvloop a pipe
        # left open outlives the process and the loop cannot close.
        await proc.communicate()
        raise
    if proc.returncode != 0:
        message = err.decode(errors="replace").strip().splitlines()
        raise RuntimeError(message[0] if message else f"py-spy exited {proc.returncode}")
    threads = _from_py_spy(json.loads(out))
    return threads, _format(threads)


# "Thread 0x00007f... (most recent call first):" then '  File "x.py", line 3 in f'
_FH_THREAD = re.compile(r"^(?:Current thread|Thread) (0x[0-9a-fA-F]+)")
_FH_FRAME = re.compile(r'^\s+File "(.*)", line (\d+) in (.*)$')


def parse_faulthandler(text: str) -> list[Thread]:
    """Threads and frames from ``faulthandler``'s dump (innermost frame first, as it prints)."""
    threads: list[Thread] = []
    current: list[Frame] | None = None
    ident = 0
    active = False
    for line in text.splitlines():
        head = _FH_THREAD.match(line)
        if head:
            if current is not None:
                threads.append(Thread(ident, None, tuple(current), active))
            current, ident, active = [], int(head.group(1), 16), line.startswith("Current")
            continue
        frame = _FH_FRAME.match(line)
        if frame and current is not None:
            current.append(Frame(frame.group(3), frame.group(1), int(frame.group(2))))
    if current is not None:
        threads.append(Thread(ident, None, tuple(current), active))
    return threads


def dump_file(directory: str | os.PathLike[str], pid: int) -> Path:
    """Where the aiotimer client ``pid`` writes its faulthandler dump (``AIOTIMER_DUMP_DIR``)."""
    return Path(directory) / dump_file_name(pid)


async def _faulthandler(
    pid: int, dump_signal: int, path: Path, timeout: float, send: Callable[[int], bool]
) -> tuple[list[Thread], str]:
    before = path.stat().st_size if path.exists() else 0
    if not send(dump_signal):
        raise RuntimeError(f"pid {pid} has exited")
    deadline = time.monotonic() + timeout
    size = before
    while time.monotonic() < deadline:
        await asyncio.sleep(0.01)
        now = path.stat().st_size if path.exists() else 0
        if now > before and now == size:  # grew, and stopped growing: the dump is complete
            break
        size = now
    with path.open("rb") as f:
        f.seek(before)
        text = f.read().decode(errors="replace")
    if not text:
        raise RuntimeError(f"pid {pid} wrote no stack dump within {timeout:g}s")
    return parse_faulthandler(text), text


async def capture_stacks(
    pid: int,
    *,
    timeout: float,
    native: bool = True,
    dump_signal: int = 0,
    dump_path: Path | None = None,
    send: Callable[[int], bool] | None = None,
) -> Stacks:
    """Capture ``pid``'s stacks within ``timeout`` seconds; never raises.

    py-spy first; then, if the process registered ``dump_signal`` and writes its
    dump to ``dump_path``, ``faulthandler`` (``send`` signals the process).
    """
    started = time.monotonic()
    result = Stacks(pid)
    reasons: list[str] = []
    binary = find_py_spy()
    if timeout <= 0:
        result.reason = "no time left to capture stacks"
        return result
    if binary is None:
        reasons.append("py-spy is not available (pip install py-spy)")
    else:
        try:
            result.threads, result.raw = await _py_spy(binary, pid, timeout, native)
            result.method = "py-spy"
        except TimeoutError:
            reasons.append(f"py-spy took longer than {timeout:.3g}s")
        except (OSError, RuntimeError, ValueError) as exc:
            reasons.append(f"py-spy failed: {exc}")
    left = timeout - (time.monotonic() - started)
    if not result.ok and dump_signal > 0 and dump_path is not None and send is not None:
        if left <= 0:
            reasons.append("no time left for a faulthandler dump")
        else:
            try:
                threads, raw = await _faulthandler(pid, dump_signal, dump_path, left, send)
                result.threads, result.raw, result.method = threads, raw, "faulthandler"
            except (OSError, RuntimeError) as exc:
                reasons.append(f"faulthandler: {exc}")
    elif not result.ok:
        reasons.append(
            "the process registered no stack-dump signal (not an aiotimer client, or not "
            "spawned by this server)"
        )
    result.reason = "; ".join(reasons) or None
    result.seconds = time.monotonic() - started
    return result
