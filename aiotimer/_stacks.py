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
import errno
import json
import os
import re
import selectors
import shutil
import signal
import stat
import subprocess
import sys
import sysconfig
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ._ioplane import run_blocking
from ._linux import process_uid
from ._protocol import dump_file_name

__all__ = [
    "ENV_PY_SPY",
    "MAX_DUMP_BYTES",
    "MAX_PY_SPY_BYTES",
    "MAX_SYMBOL_CHARS",
    "Frame",
    "Stacks",
    "Thread",
    "capture_stacks",
    "dump_file",
    "find_py_spy",
    "parse_faulthandler",
    "printable",
    "printable_lines",
    "py_spy_candidates",
    "shorten_symbol",
]

#: Environment variable: the py-spy binary to use ("" disables py-spy).
ENV_PY_SPY = "AIOTIMER_PY_SPY"
#: Most bytes of a client's faulthandler dump read into an incident (the rest is cut).
MAX_DUMP_BYTES = 1 << 20
#: Most bytes of py-spy's JSON parsed (a bigger document is refused, not parsed).
MAX_PY_SPY_BYTES = 4 << 20
#: Longest native (C/C++) function name kept as it is: a C++ symbol can run to
#: thousands of characters of template arguments (pybind11's run to 1,500 in torch).
MAX_SYMBOL_CHARS = 160
_OPEN = {"<": ">", "(": ")"}
# What a worker's text may not bring into a line a person reads: C0 and C1 controls
# (escape sequences, carriage returns, newlines that would forge a line of ours),
# DEL, Unicode's line and paragraph separators, and the bidirectional overrides
# that reorder what a terminal shows.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u200e\u200f\u2028-\u202e\u2066-\u2069]")


def _escaped(code: int) -> str:
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


# str.translate does it in C: a regex with a Python callback per match took 0.3 s
# of CPU for a 1 MiB dump of NULs, holding the GIL the watchdog's loop needs.
# The table is read off ``_CONTROL``, so the two never disagree.
_ESCAPES = {code: _escaped(code) for code in range(0x2070) if _CONTROL.match(chr(code))}
_LINES = {code: escaped for code, escaped in _ESCAPES.items() if code != ord("\n")}
#: Text escaped between two chances for another thread to run (a few ms of C each).
_CHUNK = 1 << 16


def printable(text: str) -> str:
    """``text`` with every control character escaped (ESC as ``\\x1b``, a newline as ``\\x0a``).

    For text that comes from a worker (a scope, a file or function name, a
    command line) on its way into a line a person reads: a terminal, a log, an
    incident's ``.txt``, torch's error file.  Nothing else changes (a backslash
    stays one), so escaping twice is escaping once.  Long text (a dump, in an
    I/O-plane thread) is done in chunks, letting the loop's thread take the GIL
    in between.
    """
    if _CONTROL.search(text) is None:
        return text
    return _translate(text, _ESCAPES)


def _translate(text: str, table: dict[int, str]) -> str:
    if len(text) <= _CHUNK:
        return text.translate(table)
    parts = []
    for start in range(0, len(text), _CHUNK):
        parts.append(text[start : start + _CHUNK].translate(table))
        time.sleep(0)  # the GIL, for the loop
    return "".join(parts)


def printable_lines(text: str) -> str:
    """``text`` with its newlines kept as line breaks and every other control escaped."""
    return _translate(text, _LINES)


def _elide_groups(name: str) -> str | None:
    """``name`` with its ``<...>`` and ``(...)`` groups emptied (``None``: unbalanced).

    ``f<a<b>, c>(int)::{lambda(x)#1}::_FUN`` becomes ``f<...>(...)::{lambda(...)#1}::_FUN``.
    """
    out: list[str] = []
    closing: list[str] = []
    for char in name:
        if closing:
            if char in _OPEN:
                closing.append(_OPEN[char])
            elif char in (">", ")"):
                if char != closing[-1]:
                    return None
                closing.pop()
                if not closing:
                    out.append("..." + char)
            continue
        out.append(char)
        if char in _OPEN:
            closing.append(_OPEN[char])
        elif char in (">", ")"):
            return None
    return None if closing else "".join(out)


def shorten_symbol(name: str, limit: int = MAX_SYMBOL_CHARS) -> str:
    """A native symbol cut to at most ``limit`` characters, keeping what it names.

    Template and argument lists are elided first (``<...>``, ``(...)``), so the
    namespaces, class and function stay readable; what is still too long is cut
    with ``...``.  A name within ``limit`` is returned unchanged.
    """
    if len(name) <= limit:
        return name
    # "operator<<" and "operator()" would unbalance the groups: leave those to the cut.
    elided = None if "operator" in name else _elide_groups(name)
    if elided is not None and len(elided) <= limit:
        return elided
    short = elided or name
    return short[: limit - 3] + "..."


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


def py_spy_candidates() -> list[str]:
    """Where py-spy is looked for, in order: beside the interpreter, its scripts dir, PATH.

    A venv's binaries are often called without activating the venv (systemd
    units, Slurm scripts): then PATH does not name the venv, but py-spy is
    installed beside the interpreter running aiotimer.
    """
    places = [os.path.dirname(sys.executable), sysconfig.get_path("scripts")]
    places += os.environ.get("PATH", os.defpath).split(os.pathsep)
    return list(dict.fromkeys(p for p in places if p))


def find_py_spy() -> str | None:
    """The py-spy binary: ``AIOTIMER_PY_SPY`` if set ("" for none), else the first found."""
    configured = os.environ.get(ENV_PY_SPY)
    if configured is not None:
        return configured or None
    return shutil.which("py-spy", path=os.pathsep.join(py_spy_candidates()))


def _py_spy_missing() -> str:
    configured = os.environ.get(ENV_PY_SPY)
    if configured is not None:
        return f"py-spy is not available ({ENV_PY_SPY} is empty: turned off)"
    looked = ", ".join(py_spy_candidates()[:3])
    return (
        f"py-spy is not available (looked beside the interpreter and on PATH: {looked}, ...; "
        "pip install py-spy)"
    )


def _format(threads: list[Thread]) -> str:
    """The threads as text for a person; every name the process chose is escaped."""
    lines: list[str] = []
    for t in threads:
        name = f" ({printable(t.name)})" if t.name else ""
        lines.append(f"Thread {t.id}{name}{' (active)' if t.active else ''}")
        for f in t.frames:
            where = f"{f.file}:{f.line}" if f.line else f.file
            lines.append(f"    {printable(f.function)} ({printable(where)})")
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
            function = str(f.get("name") or "?")
            if native:
                function = shorten_symbol(function)
            frames.append(Frame(function, filename, int(f.get("line") or 0), native))
        threads.append(
            Thread(
                int(item.get("os_thread_id") or item.get("thread_id") or 0),
                item.get("thread_name") if isinstance(item.get("thread_name"), str) else None,
                tuple(frames),
                bool(item.get("active")),
            )
        )
    return threads


def _run_py_spy(argv: list[str], timeout: float) -> tuple[int, bytes, bytes, bool]:
    """Run py-spy for at most ``timeout`` seconds: exit status, stdout, stderr, stdout too big.

    Blocks (fork, exec, reads): the I/O plane's.  Forking a big launcher (one
    that imported torch) takes tens of milliseconds, which the loop must not
    spend.  py-spy runs in a session of its own, killed whole on a timeout;
    its output is kept up to ``MAX_PY_SPY_BYTES`` and the rest read and dropped.
    """
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    assert proc.stdout is not None and proc.stderr is not None
    out_fd, err_fd = proc.stdout.fileno(), proc.stderr.fileno()
    kept = {out_fd: bytearray(), err_fd: bytearray()}
    limits = {out_fd: MAX_PY_SPY_BYTES + 1, err_fd: 4096}
    deadline = time.monotonic() + timeout
    try:
        with selectors.DefaultSelector() as selector:
            for pipe in (proc.stdout, proc.stderr):
                selector.register(pipe, selectors.EVENT_READ)
            while selector.get_map():
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError
                for key, _ in selector.select(left):
                    fd = key.fd
                    chunk = os.read(fd, 64 * 1024)
                    if not chunk:
                        selector.unregister(fd)
                        continue
                    room = limits[fd] - len(kept[fd])
                    kept[fd] += chunk[: max(room, 0)]
        status = proc.wait(max(0.0, deadline - time.monotonic()))
    except (TimeoutError, subprocess.TimeoutExpired):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise TimeoutError from None
    finally:
        proc.stdout.close()
        proc.stderr.close()
    out = bytes(kept[out_fd])
    return status, out[:MAX_PY_SPY_BYTES], bytes(kept[err_fd]), len(out) > MAX_PY_SPY_BYTES


def _parse_py_spy(out: bytes) -> tuple[list[Thread], str]:
    threads = _from_py_spy(json.loads(out))
    return threads, _format(threads)


async def _py_spy(binary: str, pid: int, timeout: float, native: bool) -> tuple[list[Thread], str]:
    argv = [binary, "dump", "--pid", str(pid), "--json"]
    if native:
        argv.append("--native")
    status, out, err, over = await run_blocking(_run_py_spy, argv, timeout)
    if status != 0:
        message = err.decode(errors="replace").strip().splitlines()
        raise RuntimeError(message[0] if message else f"py-spy exited {status}")
    if over:
        raise RuntimeError(f"py-spy printed over {MAX_PY_SPY_BYTES} bytes; not parsed")
    # Parsed in the I/O plane too: a big document would hold the loop for milliseconds.
    return await run_blocking(_parse_py_spy, out)


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


class _DumpFile:
    """A client's dump file, opened so that nothing the client put there can block or flood us.

    ``O_NONBLOCK`` (a FIFO there opens at once, and is then refused),
    ``O_NOFOLLOW`` (a symlink is refused), then it must be a regular file owned
    by ``uid``; it is read from an offset, at most ``MAX_DUMP_BYTES``.  Every
    method blocks (a syscall on a file): call them through ``run_blocking``.
    """

    def __init__(self, path: Path, uid: int | None) -> None:
        flags = os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOCTTY
        try:
            self.fd = os.open(path, flags)
        except FileNotFoundError:
            raise RuntimeError(f"no dump file at {path}") from None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise RuntimeError(f"{path} is a symlink; not followed") from None
            raise RuntimeError(f"cannot open {path}: {exc.strerror}") from None
        try:
            info = os.fstat(self.fd)
            if not stat.S_ISREG(info.st_mode):
                raise RuntimeError(f"{path} is not a regular file; not read")
            if uid is not None and info.st_uid != uid:
                raise RuntimeError(
                    f"{path} belongs to uid {info.st_uid}, not to the process's uid {uid}; not read"
                )
        except BaseException:
            os.close(self.fd)
            raise

    def size(self) -> int:
        """Its size now."""
        return os.fstat(self.fd).st_size

    def read(self, offset: int) -> tuple[str, bool]:
        """Its text from ``offset``, at most ``MAX_DUMP_BYTES``; whether there was more."""
        data = os.pread(self.fd, MAX_DUMP_BYTES + 1, offset)
        over = len(data) > MAX_DUMP_BYTES
        return data[:MAX_DUMP_BYTES].decode(errors="replace"), over

    def close(self) -> None:
        """Close it."""
        os.close(self.fd)


def _parse_dump(text: str, truncated: bool) -> tuple[list[Thread], str]:
    threads = parse_faulthandler(text)
    # The process wrote this file: its lines stay lines, anything else is escaped
    # (faulthandler escapes names itself; a forged dump does not).
    text = printable_lines(text)
    if len(text) > MAX_DUMP_BYTES:  # escaping grows it (a NUL is four characters)
        text, truncated = text[:MAX_DUMP_BYTES], True
    if truncated:
        text += f"\n[aiotimer: the dump was cut at {MAX_DUMP_BYTES} bytes]\n"
    return threads, text


async def _faulthandler(
    pid: int, dump_signal: int, path: Path, timeout: float, send: Callable[[int], bool]
) -> tuple[list[Thread], str]:
    # Every file operation in the I/O plane: the client controls what is at
    # ``path`` (a FIFO, a symlink, a file of gigabytes), the loop must not care.
    uid = await run_blocking(process_uid, pid)
    dump = await run_blocking(_DumpFile, path, uid)
    try:
        before = size = await run_blocking(dump.size)
        if not send(dump_signal):
            raise RuntimeError(f"pid {pid} has exited")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            await asyncio.sleep(0.01)
            now = await run_blocking(dump.size)
            if now > before and now == size:  # grew, and stopped growing: the dump is complete
                break
            size = now
        text, truncated = await run_blocking(dump.read, before)
    finally:
        await run_blocking(dump.close)
    if not text:
        raise RuntimeError(f"pid {pid} wrote no stack dump within {timeout:g}s")
    return await run_blocking(_parse_dump, text, truncated)


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
        reasons.append(_py_spy_missing())
    else:
        try:
            result.threads, result.raw = await _py_spy(binary, pid, timeout, native)
            result.method = "py-spy"
        except TimeoutError:
            reasons.append(f"py-spy took longer than {timeout:.3g}s")
        except Exception as exc:  # MemoryError included: a capture never raises
            reasons.append(f"py-spy failed: {exc!r}" if not str(exc) else f"py-spy failed: {exc}")
    left = timeout - (time.monotonic() - started)
    if not result.ok and dump_signal > 0 and dump_path is not None and send is not None:
        if left <= 0:
            reasons.append("no time left for a faulthandler dump")
        else:
            try:
                threads, raw = await _faulthandler(pid, dump_signal, dump_path, left, send)
                result.threads, result.raw, result.method = threads, raw, "faulthandler"
            except TimeoutError:
                reasons.append(f"faulthandler: no dump within {left:.3g}s")
            except Exception as exc:  # MemoryError included: a capture never raises
                reasons.append(f"faulthandler: {exc}")
    elif not result.ok:
        reasons.append(
            "the process registered no stack-dump signal (not an aiotimer client, or not "
            "spawned by this server)"
        )
    result.reason = "; ".join(reasons) or None
    result.seconds = time.monotonic() - started
    return result
