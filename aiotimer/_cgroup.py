"""Each rank's attempt in a cgroup v2 of its own, ended with ``cgroup.kill``.

Why a cgroup: process groups and the job token (``AIOTIMER_JOB_TOKEN``) miss a
process that left both, a daemon that ``setsid()``\\ s and clears its
environment.  A cgroup holds every descendant whatever it does, and writing
``1`` to ``cgroup.kill`` (Linux 5.14) SIGKILLs the lot in one step, with no
``/proc`` scan and no pid that could be reused in between.

Where cgroup v2 is not mounted or not writable (not root and nothing delegated
to us, as in most unprivileged containers), ``JobCgroup.create`` says why and
the launcher keeps to process groups and tokens.

A launcher that is SIGKILLed cannot clean up after itself: with the job's
cgroup a *keeper* starts, a small process in a session of its own with no
stdio, that waits on a pidfd for the launcher's exit and then kills and
removes whatever cgroups of the job are left.  When the launcher closes the
job normally it stops the keeper itself.

Every function here blocks (file writes in cgroupfs, waits for the killed to
exit): callers run them in the I/O plane, never on the watchdog loop.
"""

from __future__ import annotations

import contextlib
import os
import select
import subprocess
import sys
import time
from pathlib import Path

__all__ = ["JobCgroup", "kill_cgroup"]

#: How a worker enters its cgroup before it runs: the shell writes its own pid
#: (``0`` means "the writer") into ``cgroup.procs`` and execs the command, so
#: nothing the command starts is ever outside.  The pid stays the same.
_ENTER = (
    'echo 0 > "$0/cgroup.procs" || '
    '{ echo "aiotimer: cannot enter cgroup $0" >&2; exit 126; }; exec "$@"'
)

_KEEPER = """
import os, select, sys
sys.path[:0] = [sys.argv[3]]
from aiotimer._cgroup import _remove_tree
job, launcher = sys.argv[1], int(sys.argv[2])
try:
    fd = os.pidfd_open(launcher)
except ProcessLookupError:
    fd = None
if fd is not None and os.getppid() == launcher:  # else it died before we looked
    select.select([fd], [], [])  # readable once the launcher has exited
_remove_tree(job, 10.0)
"""


def _cgroup2_mount() -> Path:
    """Where the cgroup v2 hierarchy is mounted (``/sys/fs/cgroup``, or ``.../unified``)."""
    with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
        for line in f:
            # "<id> <parent> <dev> <root> <mount point> <opts> [tags] - <fstype> <src> <opts>"
            before, _, after = line.partition(" - ")
            if after.split(" ", 1)[0] == "cgroup2":
                return Path(before.split(" ")[4])
    raise LookupError("no cgroup v2 hierarchy is mounted")


def _own_cgroup() -> str:
    """This process's cgroup v2 path (``0::/...`` in ``/proc/self/cgroup``)."""
    with open("/proc/self/cgroup", encoding="utf-8") as f:
        for line in f:
            if line.startswith("0::"):
                return line[3:].strip()
    raise LookupError("this process is in no cgroup v2")


def _populated(cgroup: Path) -> bool:
    with open(cgroup / "cgroup.events", encoding="ascii") as f:
        return "populated 1" in f.read()


def kill_cgroup(cgroup: str | os.PathLike[str], timeout: float = 5.0) -> int:
    """SIGKILL every process in ``cgroup`` and below, wait (at most ``timeout`` s), remove it.

    Returns how many processes were in it.  A cgroup that is gone already
    counts 0.  Blocks: the I/O plane's.
    """
    cgroup = Path(cgroup)
    count = 0
    for directory, _, _ in os.walk(cgroup):
        with contextlib.suppress(FileNotFoundError):
            count += len((Path(directory) / "cgroup.procs").read_text().split())
    if count:
        with contextlib.suppress(FileNotFoundError):
            (cgroup / "cgroup.kill").write_text("1")
    _wait_empty(cgroup, timeout)
    for directory, _, _ in sorted(os.walk(cgroup), key=lambda w: -len(w[0])):
        with contextlib.suppress(FileNotFoundError):
            os.rmdir(directory)
    return count


def _wait_empty(cgroup: Path, timeout: float) -> None:
    """Until nothing in ``cgroup`` runs: the kernel wakes ``poll`` on ``cgroup.events``."""
    deadline = time.monotonic() + timeout
    try:
        fd = os.open(cgroup / "cgroup.events", os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    try:
        poller = select.poll()
        poller.register(fd, select.POLLPRI | select.POLLERR)
        while _populated(cgroup):
            left = deadline - time.monotonic()
            if left <= 0:
                return
            # An event on the file, or 50 ms: a missed edge costs a retry, not the wait.
            poller.poll(min(left, 0.05) * 1000)
    except FileNotFoundError:
        return
    finally:
        os.close(fd)


def _remove_tree(job: str, timeout: float) -> None:
    """The keeper's work: kill and remove whatever is left of the job's cgroups."""
    with contextlib.suppress(OSError):
        kill_cgroup(job, timeout)


class JobCgroup:
    """The job's cgroup, beside nothing else: one child cgroup per rank and attempt.

    Made under the launcher's own cgroup (a cgroup with no controllers enabled
    below it may hold both processes and children).
    """

    def __init__(self, path: Path, keeper: subprocess.Popen[bytes] | None) -> None:
        self.path = path
        self._keeper = keeper

    @classmethod
    def create(cls, name: str, *, keeper: bool = True) -> JobCgroup | str:
        """Make the job's cgroup ``name``; or say, in a few words, why it cannot be used.

        The check is real: a probe process is moved into it and back out, so a
        hierarchy that lets us ``mkdir`` but not move processes is refused here,
        not when the first worker starts.
        """
        if "/" in name or name in ("", ".", ".."):
            raise ValueError(f"`name` must be a plain directory name, got {name!r}")
        try:
            path = _cgroup2_mount() / _own_cgroup().lstrip("/") / name
            path.mkdir(mode=0o755)
        except (OSError, LookupError) as exc:
            return str(exc)
        try:
            if not (path / "cgroup.kill").exists():
                raise OSError("the kernel has no cgroup.kill (Linux 5.14 or newer needed)")
            probe = path / "probe"
            probe.mkdir()
            _probe_entering(probe)
            os.rmdir(probe)
        except OSError as exc:
            kill_cgroup(path, 1.0)
            return exc.strerror or str(exc)
        started = _start_keeper(path) if keeper else None
        return cls(path, started)

    def rank(self, rank: int, attempt: int) -> Path:
        """A fresh cgroup for ``rank``'s ``attempt`` (created now)."""
        path = self.path / f"attempt_{attempt}-rank_{rank}"
        path.mkdir(mode=0o755, exist_ok=True)
        return path

    @staticmethod
    def enter(cgroup: Path, argv: list[str]) -> list[str]:
        """``argv`` wrapped so that the process enters ``cgroup`` before it runs."""
        return ["/bin/sh", "-c", _ENTER, str(cgroup), *argv]

    def close(self, timeout: float = 5.0) -> int:
        """Kill what is left in the job's cgroups, remove them, stop the keeper."""
        killed = kill_cgroup(self.path, timeout)
        if self._keeper is not None:
            self._keeper.kill()
            self._keeper.wait()
            self._keeper = None
        return killed


def _probe_entering(cgroup: Path) -> None:
    """Raise ``OSError`` unless a process can be moved into ``cgroup``."""
    probe = subprocess.run(
        JobCgroup.enter(cgroup, ["/bin/true"]),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        timeout=10,
        check=False,
    )
    if probe.returncode != 0:
        raise OSError(f"cannot move a process into {cgroup}")


def _start_keeper(job: Path) -> subprocess.Popen[bytes]:
    """The process that cleans up after a launcher that could not (SIGKILLed)."""
    package_parent = str(Path(__file__).resolve().parent.parent)
    return subprocess.Popen(
        [sys.executable, "-I", "-S", "-c", _KEEPER, str(job), str(os.getpid()), package_parent],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # a Ctrl-C or a group kill for the job does not reach it
        close_fds=True,
    )
