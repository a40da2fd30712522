"""Nothing a worker, a disk or a terminal does holds back a kill: real processes, both loops.

Each test sets up one way a worker (or the machine) could once stall the watchdog's
loop (a FIFO where its dump file was, a dump file growing to gigabytes, a terminal that
stops reading, a full disk) and checks that an innocent worker's deadline, passing
meanwhile, is handled as promptly as ever, that the hang is killed all the same, and
that nothing is left running.  "Promptly" is the decision: when the server handled the
expiry (``TimerExpired.lag``), within ``PROMPT`` of the deadline.  Speed figures are the
benchmarks' (``python -m benchmarks --scenarios isolation``); ``PROMPT`` is the promise, with the
real-time boost where this machine permits it, not a measurement.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import resource
import signal
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import WAIT, py
from test_launcher import launcher, loop, marker, workdir

from aiotimer import TimerExpired, TimerServer, Worker

__all__ = ["loop", "marker"]  # fixtures shared with test_launcher

pytestmark = pytest.mark.slow

#: How late after its deadline an innocent worker's expiry may be handled.
PROMPT = 0.005


async def ready(worker: Worker) -> None:
    assert worker.stdout is not None
    line = await asyncio.wait_for(worker.stdout.readline(), WAIT)
    assert line == b"ready\n", line


def incidents(directory: Path) -> dict[int, dict[str, object]]:
    found = {}
    for path in directory.glob("incident-*.json"):
        text = path.read_text()
        if text:  # an incident's file is claimed (empty) before it is written
            data = json.loads(text)
            found[data["pid"]] = data
    return found


# The hostile worker arms a timer (so its client registers the stack dump into its file),
# then makes the dump file something the server must not trust, then hangs.
HOSTILE = """
    import os, signal, sys, time, aiotimer
    from aiotimer._protocol import dump_file_name
    kind = sys.argv[1]
    with aiotimer.expires(after=60, scope="warm-up"):
        pass
    path = os.path.join(os.environ["AIOTIMER_DUMP_DIR"], dump_file_name(os.getpid()))
    if kind in ("fifo", "symlink", "directory"):
        os.unlink(path)
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "symlink":
        os.symlink("/etc/passwd", path)
    elif kind == "directory":
        os.mkdir(path)
    elif kind in ("sparse", "flood"):
        # On the dump signal, grow the file instead of dumping: to 3 GB at no cost
        # (sparse), or by 50 MB of junk.
        def grow(*_):
            if kind == "sparse":
                os.truncate(path, 3 << 30)
            else:
                with open(path, "ab") as f:
                    for _ in range(50):
                        f.write(b"x" * (1 << 20))
        signal.signal(int(os.environ["AIOTIMER_DUMP_SIGNAL"]), grow)
    print("ready", flush=True)
    with aiotimer.expires(after=0.3, scope="hostile"):
        time.sleep(600)
"""

INNOCENT = """
    import time, aiotimer
    print("ready", flush=True)
    with aiotimer.expires(after=0.7, scope="innocent"):
        time.sleep(600)
"""


@pytest.mark.parametrize(
    ("kind", "py_spy", "reason"),
    [
        ("fifo", "absent", "not a regular file"),
        ("fifo", "present", None),
        ("symlink", "absent", "is a symlink; not followed"),
        ("directory", "absent", "not a regular file"),
        ("sparse", "absent", None),
        ("flood", "absent", None),
    ],
)
async def test_a_hostile_dump_file_never_delays_another_workers_kill(
    kind: str,
    py_spy: str,
    reason: str | None,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    realtime_permitted: bool,
) -> None:
    if py_spy == "absent":
        monkeypatch.setenv("AIOTIMER_PY_SPY", "")
    lags: dict[int, float] = {}
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    async with TimerServer(incident_dir=tmp_path, realtime=realtime_permitted) as server:

        def seen(event: object) -> None:
            if isinstance(event, TimerExpired) and event.pid is not None:
                lags.setdefault(event.pid, event.lag)

        server.events.subscribe(seen)
        pipe = asyncio.subprocess.PIPE
        hostile = await server.spawn(*py(HOSTILE), kind, stdout=pipe)
        await ready(hostile)
        innocent = await server.spawn(*py(INNOCENT), stdout=pipe)
        await ready(innocent)
        assert await asyncio.wait_for(innocent.wait(), WAIT) == -signal.SIGKILL
        assert await asyncio.wait_for(hostile.wait(), WAIT) == -signal.SIGKILL
        await asyncio.wait_for(_until(lambda: len(incidents(tmp_path)) == 2), WAIT)
    assert lags[innocent.pid] <= PROMPT, f"the innocent worker's expiry was {lags} late"
    found = incidents(tmp_path)
    stacks = found[hostile.pid]["stacks"]
    assert isinstance(stacks, dict)
    if reason is not None:
        assert reason in str(stacks["reason"]), stacks["reason"]
    if py_spy == "present":
        assert stacks["method"] == "py-spy"
    # Read at most 1 MiB of a dump file, whatever the worker made of it.
    assert len(str(stacks["raw"])) <= (1 << 20) + 200
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
    assert grown_mib < 200, f"the server grew by {grown_mib:.0f} MiB"


async def _until(predicate: object) -> None:
    assert callable(predicate)
    while not predicate():
        await asyncio.sleep(0.02)


async def test_a_capture_that_raises_never_stops_the_kill(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A MemoryError (or any bug) while capturing costs the stacks, never the kill."""
    import aiotimer._incidents as incidents_module

    def broken(*args: object, **kwargs: object) -> object:
        raise MemoryError("no memory left for the capture")

    monkeypatch.setattr(incidents_module, "capture_stacks", broken)
    async with TimerServer(incident_dir=tmp_path) as server:
        worker = await server.spawn(*py(INNOCENT), stdout=asyncio.subprocess.PIPE)
        await ready(worker)
        assert await asyncio.wait_for(worker.wait(), WAIT) == -signal.SIGKILL
    assert os.path.isdir(tmp_path)


# -- aiotimer run: a terminal, a FIFO or a disk that stops taking what it is given ----------

# Rank 0 is noisy (floods the stream named by its argument, or makes a descendant that
# ignores SIGTERM and then fails); rank 1 is the innocent that hangs.
NOISY = """
    import os, signal, subprocess, sys, time, aiotimer
    mode = sys.argv[1]
    if os.environ["RANK"] == "1":
        print("innocent ready", flush=True)
        with aiotimer.expires(after=2.0, scope="innocent"):
            time.sleep(600)
    if mode == "descendant":
        subprocess.Popen([sys.executable, "-c",
            "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"])
        time.sleep(1.9)
        sys.exit(1)
    out = sys.stderr.buffer if mode == "stderr" else sys.stdout.buffer
    line = b"x" * 1023 + b"\\n"
    end = time.monotonic() + 5
    while time.monotonic() < end:
        out.write(line * 64)
        out.flush()
    time.sleep(600)
"""


def _records(path: Path) -> list[dict[str, object]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _innocent_lateness(events: Path) -> float | None:
    for record in _records(events):
        if record.get("event") == "timer expired" and record.get("scope") == "innocent":
            return float(record["lateness"])  # type: ignore[arg-type]
    return None


def _wait_until(predicate: object, timeout: float = WAIT) -> None:
    import time

    assert callable(predicate)
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, "condition not met in time"
        time.sleep(0.05)


def _drain(stream: object) -> tuple[list[bytes], threading.Thread]:
    """Read ``stream`` to its end in a thread; the list fills as it reads."""
    chunks: list[bytes] = []

    def read() -> None:
        while chunk := stream.read1(1 << 16):  # type: ignore[attr-defined]
            chunks.append(chunk)

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    return chunks, thread


def _run(loop: str, marker: str, mode: str, *flags: str) -> subprocess.Popen[bytes]:
    return launcher(  # type: ignore[no-any-return]
        loop,
        marker,
        "-n",
        "2",
        *flags,
        "--",
        sys.executable,
        "-c",
        textwrap.dedent(NOISY),
        mode,
        text=False,
    )


@pytest.mark.parametrize("stalled", ["stdout", "stderr"])
def test_a_terminal_that_stops_reading_never_delays_a_kill(
    stalled: str, loop: str, marker: str, tmp_path: Path
) -> None:
    events = tmp_path / "events.jsonl"
    with _run(loop, marker, stalled, "--event-log", str(events)) as proc:
        assert proc.stdout is not None and proc.stderr is not None
        # The other stream is read as it comes; the stalled one not until the kill is done.
        other, reader = _drain(proc.stderr if stalled == "stdout" else proc.stdout)
        _wait_until(lambda: any(r.get("event") == "incident recorded" for r in _records(events)))
        lateness = _innocent_lateness(events)
        assert lateness is not None and lateness <= PROMPT, f"the kill was {lateness} s late"
        rest = proc.stdout.read() if stalled == "stdout" else proc.stderr.read()
        assert proc.wait(WAIT) == 124
        reader.join(WAIT)
    assert rest  # what fitted in the budget was written once the reader came back
    if stalled == "stdout":  # the warning went to stderr, which was read
        said = b"".join(other).decode(errors="replace")
        assert "stdout is not keeping up: dropped" in said, said[-2000:]


def test_an_event_log_nobody_reads_never_delays_a_kill(
    loop: str, marker: str, tmp_path: Path
) -> None:
    fifo = tmp_path / "events.fifo"
    os.mkfifo(fifo)  # opened by nobody: a writer blocks in open() for ever
    proc = _run(loop, marker, "stdout", "--event-log", str(fifo))
    _, err = proc.communicate(timeout=WAIT)
    assert proc.returncode == 124, err.decode(errors="replace")
    (incident,) = incidents(workdir(marker) / "aiotimer-incidents").values()
    assert incident["scopes"] == ["innocent"]
    assert float(incident["lateness"]) <= PROMPT  # type: ignore[arg-type]


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A 256 KiB tmpfs, filled up: every write there fails with ENOSPC (needs root)."""
    where = tmp_path / "full"
    where.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(where)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        (where / "here").mkdir()  # made before the filler takes the last block
        with contextlib.suppress(OSError), open(where / "filler", "wb") as f:
            while True:
                f.write(b"\0" * 4096)
                f.flush()
        yield where / "here"
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


@pytest.mark.parametrize("full", ["--incident-dir", "--log-dir"])
def test_a_full_disk_costs_the_data_never_the_kill(
    full: str, loop: str, marker: str, tmp_path: Path, tiny_disk: Path
) -> None:
    events = tmp_path / "events.jsonl"
    proc = _run(loop, marker, "stdout", "--event-log", str(events), full, str(tiny_disk))
    out, err = proc.communicate(timeout=WAIT)
    said = err.decode(errors="replace")
    assert proc.returncode == 124, said[-3000:]
    lateness = _innocent_lateness(events)
    assert lateness is not None and lateness <= PROMPT, f"the kill was {lateness} s late"
    assert b"[rank0]: xxxx" in out  # the relay went on
    if full == "--incident-dir":
        assert "cannot write the incident" in said, said[-3000:]
    else:
        assert "--log-dir" in said and "No space left on device" in said, said[-3000:]


def test_an_unwritable_incident_dir_is_one_line_and_exit_2_at_start(
    loop: str, marker: str, tmp_path: Path
) -> None:
    afile = tmp_path / "a-file"
    afile.write_text("")
    proc = _run(loop, marker, "stdout", "--incident-dir", str(afile / "incidents"))
    _, err = proc.communicate(timeout=WAIT)
    lines = err.decode().strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, lines
    assert lines[0].startswith("aiotimer run: error: --incident-dir") and "not writable" in lines[0]


def test_a_descendant_that_ignores_sigterm_never_delays_another_ranks_kill(
    loop: str, marker: str, tmp_path: Path
) -> None:
    events = tmp_path / "events.jsonl"
    proc = _run(loop, marker, "descendant", "--restart-policy", "rank", "--event-log", str(events))
    _, err = proc.communicate(timeout=WAIT)
    assert proc.returncode == 124, err.decode(errors="replace")[-3000:]
    lateness = _innocent_lateness(events)
    assert lateness is not None and lateness <= PROMPT, f"the kill was {lateness} s late"


def test_one_ranks_children_cannot_take_the_other_ranks_admission(
    loop: str, marker: str, tmp_path: Path
) -> None:
    """Rank 0 forks children that each arm a timer, past its fair share of admissions
    (half the fd limit, 64 here); rank 1's child still gets its own, hangs and is killed."""
    import resource

    code = """
        import os, sys, time, aiotimer
        if os.environ["RANK"] == "0":
            kids = []
            for i in range(80):
                pid = os.fork()
                if pid == 0:
                    try:
                        with aiotimer.expires(after=600, scope="greedy"):
                            time.sleep(600)
                    finally:
                        os._exit(0)
                kids.append(pid)
            time.sleep(4.0)
            for pid in kids:
                os.kill(pid, 9)
                os.waitpid(pid, 0)
            sys.exit(0)
        time.sleep(1.0)  # after rank 0's children asked
        pid = os.fork()
        if pid == 0:
            with aiotimer.expires(after=0.5, scope="rank 1's child"):
                time.sleep(600)
            os._exit(0)
        os.waitpid(pid, 0)
    """

    def low_fd_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (128, 128))

    events = tmp_path / "events.jsonl"
    proc = launcher(
        loop, marker, "-n", "2", "--event-log", str(events), code=code, preexec_fn=low_fd_limit
    )
    _, err = proc.communicate(timeout=WAIT)
    said = err if isinstance(err, str) else err.decode()
    assert proc.returncode in (0, 124), said[-3000:]
    records = _records(events)
    killed = [r for r in records if r.get("event") == "timer expired"]
    assert [r["scope"] for r in killed] == ["rank 1's child"], said[-3000:]
    assert any("fair share" in str(r.get("reason", "")) for r in records), said[-3000:]
