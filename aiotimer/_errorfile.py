"""torch's error file for a hung rank: where its launcher said, as the hung process's user.

torchrun shows the error file of the first failed rank as the "Root Cause" of
its ``ChildFailedError``.  The path is taken from the environment its launcher
(torchrun's agent, ``aiotimer run``) gave the rank, never from a hung
descendant's own, and the file is created ``O_EXCL|O_NOFOLLOW`` by a
short-lived child that has become the hung process's uid, gid and groups when
they are not ours: a worker that dropped privileges cannot make a root
launcher write where it could not.  Blocks: the I/O plane's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass

from ._events import logger
from ._incident import Incident, iso_time
from ._linux import environ_of, parent_pid
from ._stacks import printable, printable_lines

__all__ = ["error_file_source", "owner_of", "try_error_file", "write_torch_error_file"]

# Most of /proc/PID/status read.
_STATUS_BYTES = 64 * 1024
# Most parents walked from a hung process up to its worker.
_MAX_ANCESTRY = 64


@dataclass(frozen=True)
class _Owner:
    """Whom a process acts as on files: its filesystem uid and gid, and its groups."""

    uid: int
    gid: int
    groups: tuple[int, ...] = ()


def owner_of(pid: int) -> _Owner | None:
    """``pid``'s file credentials from ``/proc/PID/status``; ``None`` if it is gone.

    Blocks: the I/O plane's.
    """
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            raw = f.read(_STATUS_BYTES)
    except OSError:
        return None
    fields: dict[str, list[str]] = {}
    for line in raw.decode(errors="replace").splitlines():
        key, _, value = line.partition(":")
        if key in ("Uid", "Gid", "Groups"):
            fields[key] = value.split()
    try:
        # real, effective, saved, filesystem: the kernel checks files against the last
        return _Owner(
            int(fields["Uid"][3]), int(fields["Gid"][3]), tuple(map(int, fields["Groups"]))
        )
    except (KeyError, IndexError, ValueError):
        return None


def error_file_source(pid: int, worker_pid: int | None, own: str | None) -> tuple[str | None, int]:
    """torch's error file for ``pid`` as its launcher set it, and whose environment says so.

    When ``pid`` descends from its spawned worker ``worker_pid``, the value is
    the one of the first process on the way down from the worker that has
    ``TORCHELASTIC_ERROR_FILE``: the worker itself under ``aiotimer run``, the
    rank torchrun's agent started under ``serve -- torchrun``.  A descendant's
    own value never overrides its ancestors'.  Otherwise (no worker, or it is
    no longer an ancestor): ``own``, ``pid``'s own.  Blocks: the I/O plane's.
    """
    chain = [pid]
    if worker_pid is not None and worker_pid != pid:
        at: int | None = pid
        for _ in range(_MAX_ANCESTRY):
            at = parent_pid(at) if at is not None else None
            if at is None or at <= 1:
                break
            chain.append(at)
            if at == worker_pid:
                break
        if chain[-1] != worker_pid:
            chain = [pid]
    for ancestor in reversed(chain[1:]):
        value = environ_of(ancestor).get("TORCHELASTIC_ERROR_FILE")
        if value:
            return value, ancestor
    return own, pid


def _error_file_data(incident: Incident) -> bytes:
    """torch's error file for ``incident``: JSON whose every string is escaped for a terminal."""
    stacks = incident.stacks
    summary = f"aiotimer: watchdog timeout: {incident.summary()}"
    details = [
        summary,
        f"timer {', '.join(repr(s) for s in incident.scopes)} expired "
        f"{incident.lateness * 1e3:.2f} ms ago (deadline {iso_time(incident.deadline)})",
    ]
    if incident.path is not None:
        details.append(f"incident: {incident.path.with_suffix('.txt')}")
    if stacks is not None:
        details.append(stacks.raw.rstrip() if stacks.ok else f"(no stacks: {stacks.reason})")
    data = {
        "message": {
            "message": printable(f"TimeoutError: {summary}"),
            "extraInfo": {
                # torchrun prints it as it is: our line breaks stay, nothing else does
                "py_callstack": "\n".join(map(printable_lines, details)),
                "timestamp": str(int(time.time())),
            },
        }
    }
    return json.dumps(data).encode()


# Run as root, as a child of the launcher: becomes the hung process's uid, gid and
# groups for good (every uid set: no capability is left), then creates the file
# exclusively, never through a link.  argv: path, uid, gid, groups; stdin: the data.
_AS_OWNER = """\
import os, sys
path, uid, gid = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
groups = [int(g) for g in sys.argv[4].split(",") if g]
data = sys.stdin.buffer.read()
try:
    os.setgroups(groups)
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
except OSError as exc:
    sys.stderr.write(f"cannot act as uid {uid} (gid {gid}): {exc.strerror}")
    sys.exit(4)
flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOCTTY
try:
    fd = os.open(path, flags, 0o644)
except FileExistsError:
    sys.exit(3)
except OSError as exc:
    sys.stderr.write(f"{exc.strerror} (as uid {uid})")
    sys.exit(5)
with os.fdopen(fd, "wb") as f:
    f.write(data)
"""


_EXISTS = 3


def _create(path: str, data: bytes, owner: _Owner | None, timeout: float) -> str | None:
    """Create ``path`` with ``data`` as ``owner`` would; ``None``, or why not (``"exists"``).

    Blocks (a child process, a file): the I/O plane's.  As ourselves when
    ``owner`` is us (or unknown to us: ``None``), else in a child that becomes
    ``owner`` first, so the kernel decides whether that uid may create it there.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NOCTTY
    if owner is None or (owner.uid, owner.gid) == (os.geteuid(), os.getegid()):
        try:
            fd = os.open(path, flags, 0o644)
        except FileExistsError:
            return "exists"
        except OSError as exc:
            return exc.strerror or str(exc)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return None
    argv = [
        os.path.realpath(sys.executable),
        "-I",
        "-S",
        "-c",
        _AS_OWNER,
        path,
        str(owner.uid),
        str(owner.gid),
        ",".join(map(str, owner.groups)),
    ]
    try:
        done = subprocess.run(
            argv,
            input=data,
            capture_output=True,
            timeout=timeout,
            cwd="/",
            # -I ignores PYTHON*; a shared libpython may need its library path
            env={k: v for k, v in os.environ.items() if k == "LD_LIBRARY_PATH"},
            start_new_session=True,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return f"not done within {timeout:.3g}s (as uid {owner.uid})"
    except OSError as exc:
        return f"cannot start {argv[0]}: {exc}"
    if done.returncode == 0:
        return None
    if done.returncode == _EXISTS:
        return "exists"
    said = done.stderr.decode(errors="replace").strip()[:200]
    return said or f"the writer exited {done.returncode} (as uid {owner.uid})"


def write_torch_error_file(
    path: str, incident: Incident, *, owner: _Owner | None = None, timeout: float = 5.0
) -> bool:
    """Write torchrun's error file for ``incident`` at ``path``, unless a file is there already.

    torchrun shows the error file of the first failed rank as the "Root Cause"
    of its ``ChildFailedError``.  A file the worker wrote itself is never
    replaced, nor is a link followed (``O_CREAT|O_EXCL|O_NOFOLLOW``).  Only an
    absolute ``path`` is taken.  ``owner``: the hung process's credentials;
    when they are not ours, the file is created by a child that acts as that
    uid (for at most ``timeout`` seconds), so it is made only where the hung
    process could make it, and is its own.  Blocks: the I/O plane's.
    """
    return try_error_file(path, incident, owner, timeout) is None


def try_error_file(
    path: str, incident: Incident, owner: _Owner | None, timeout: float
) -> str | None:
    """``write_torch_error_file``; ``None`` once written, else why not."""
    why: str | None = "not an absolute path"
    if os.path.isabs(path):
        why = _create(path, _error_file_data(incident), owner, timeout)
    if why is not None and why != "exists":
        logger.warning("cannot write torchrun's error file %r: %s", path, why)
    return why
