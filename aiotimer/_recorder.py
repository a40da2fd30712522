"""Where incidents are written: files never overwritten, a directory kept within its budget.

``IncidentRecorder`` claims a fresh name per incident (``O_EXCL``), replaces an
incident's own files atomically (``mkstemp`` + ``os.replace``: never through a
link), and keeps the directory within ``max_incidents`` and ``max_bytes`` by
removing its own oldest ``incident-*`` files, never another file.  Blocks: the
I/O plane's.
"""

from __future__ import annotations

import collections
import contextlib
import datetime
import itertools
import json
import os
import re
import stat
import tempfile
import threading
from pathlib import Path

from ._events import logger
from ._incident import Incident
from ._validate import check_count

__all__ = ["DEFAULT_MAX_INCIDENTS", "DEFAULT_MAX_INCIDENT_BYTES", "IncidentRecorder"]

_seq = itertools.count(1)


#: Incidents an incident directory keeps (each a ``.json`` and its ``.txt``); over it,
#: aiotimer's own oldest ``incident-*`` files are removed.
DEFAULT_MAX_INCIDENTS = 1000


#: Bytes of incidents an incident directory keeps; over it, the oldest are removed.
DEFAULT_MAX_INCIDENT_BYTES = 1 << 30


# The names IncidentRecorder gives (no other file of the directory is ever removed).
_OURS = re.compile(r"incident-\d{8}T\d{6}-pid\d+-\d+-\d+")


class IncidentRecorder:
    """Writes incidents into ``directory``: ``incident-<time>-<pid>-<n>.json`` and ``.txt``.

    A new incident never overwrites a file; an incident's own files are
    replaced atomically when it is updated (the kill escalated, a repeat was
    counted).  The directory keeps at most ``max_incidents`` incidents and
    ``max_bytes`` bytes of them (``None``: no bound): over either, the oldest of
    aiotimer's own incidents (regular files of this uid named as this class
    names them, from this run or an earlier one) are removed first, with one
    warning; no other file is ever removed.  Files other processes write into
    the directory meanwhile are counted from the next start on.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        max_incidents: int | None = DEFAULT_MAX_INCIDENTS,
        max_bytes: int | None = DEFAULT_MAX_INCIDENT_BYTES,
    ) -> None:
        # Absolute: the path is reported (events, torch's error file) to readers elsewhere.
        self.directory = Path(directory).absolute()
        self.max_incidents = check_count("max_incidents", max_incidents, optional=True)
        self.max_bytes = check_count("max_bytes", max_bytes, optional=True)
        #: incidents removed to keep the directory within its budget
        self.removed = 0
        # Two I/O-plane threads may claim one incident at once (torch's error file,
        # still pending when its wait timed out, and the incident's own write):
        # without the lock each would make a file, and one would stay empty.
        self._claiming = threading.Lock()
        # Our incidents in the directory, oldest first: base name -> bytes (read once).
        self._kept: collections.OrderedDict[str, int] | None = None
        self._bytes = 0
        self._warned = False

    def claim(self, incident: Incident) -> Path:
        """Give ``incident`` a file of its own (created empty, never another's).

        Safe to call from several threads at once: one file is made.
        """
        with self._claiming:
            return self._claim(incident)

    def _claim(self, incident: Incident) -> Path:
        if incident.path is None:
            self.directory.mkdir(parents=True, exist_ok=True)
            kept = self._load()
            stamp = datetime.datetime.fromtimestamp(incident.time, tz=datetime.UTC)
            base = f"incident-{stamp:%Y%m%dT%H%M%S}-pid{incident.pid}-{os.getpid()}-{next(_seq)}"
            path = self.directory / f"{base}.json"
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW
            os.close(os.open(path, flags, 0o644))  # claimed: nothing else will write there
            incident.path = path
            kept[base] = 0
            self._rotate(keep=base)
        return incident.path

    def write(self, incident: Incident) -> Path:
        """Write (or update) ``incident``'s files; return the JSON file's path.

        An incident already removed to keep within the budget is not written again.
        """
        self.claim(incident)
        path = incident.path
        assert path is not None
        base = path.stem
        with self._claiming:
            if self._kept is not None and base not in self._kept:
                return path  # rotated out while it waited
        size = self._replace(path, json.dumps(incident.to_dict(), indent=1) + "\n")
        size += self._replace(path.with_suffix(".txt"), incident.text())
        with self._claiming:
            kept = self._load()
            if base in kept:
                self._bytes += size - kept[base]
                kept[base] = size
                self._rotate(keep=base)
            else:  # rotated out while it was written: gone for good
                self._remove(base)
        return path

    def preload(self) -> None:
        """Read which incidents the directory holds already (if it exists).

        Done when the reaper opens, so the first claim (before a kill) does not
        scan.  Blocks: the I/O plane's.
        """
        with self._claiming:
            if self._kept is None and self.directory.is_dir():
                self._load()

    @property
    def kept(self) -> int:
        """How many of aiotimer's incidents the directory holds (as far as this recorder knows)."""
        with self._claiming:
            return 0 if self._kept is None else len(self._kept)

    def _load(self) -> collections.OrderedDict[str, int]:
        """Our incidents in the directory, oldest first; read on the first claim.  Locked."""
        if self._kept is not None:
            return self._kept
        found: dict[str, tuple[int, int]] = {}  # base name -> (oldest mtime, bytes)
        uid = os.geteuid()
        with os.scandir(self.directory) as entries:
            for entry in entries:
                base, _, suffix = entry.name.rpartition(".")
                if suffix not in ("json", "txt") or not _OURS.fullmatch(base):
                    continue
                try:
                    info = entry.stat(follow_symlinks=False)
                except OSError:
                    continue
                if not stat.S_ISREG(info.st_mode) or info.st_uid != uid:
                    continue  # not ours: counted as nothing, never removed
                mtime, size = found.get(base, (info.st_mtime_ns, 0))
                found[base] = (min(mtime, info.st_mtime_ns), size + info.st_size)
        oldest_first = sorted(found.items(), key=lambda item: (item[1][0], item[0]))
        self._kept = collections.OrderedDict((base, size) for base, (_, size) in oldest_first)
        self._bytes = sum(self._kept.values())
        return self._kept

    def _rotate(self, keep: str) -> None:
        """Remove the oldest incidents until within the budget; never ``keep``.  Locked."""
        kept = self._load()
        removed = 0
        while kept and (
            (self.max_incidents is not None and len(kept) > self.max_incidents)
            or (self.max_bytes is not None and self._bytes > self.max_bytes)
        ):
            oldest = next(iter(kept))
            if oldest == keep:
                break
            self._bytes -= kept.pop(oldest)
            self._remove(oldest)
            removed += 1
        self.removed += removed
        if removed and not self._warned:
            self._warned = True
            budget = " and ".join(
                text
                for text in (
                    None if self.max_incidents is None else f"{self.max_incidents} incidents",
                    None if self.max_bytes is None else f"{self.max_bytes} bytes",
                )
                if text
            )
            logger.warning(
                "the incident directory %s is over its budget (%s): removing its oldest "
                "incidents (not logged one by one)",
                self.directory,
                budget,
            )

    def _remove(self, base: str) -> None:
        for suffix in (".json", ".txt"):
            try:
                os.unlink(self.directory / f"{base}{suffix}")  # unlink never follows a link
            except FileNotFoundError:
                pass
            except OSError as exc:  # the budget is best effort; the new incident is not
                logger.debug("cannot remove %s%s: %s", base, suffix, exc)

    @staticmethod
    def _replace(path: Path, text: str) -> int:
        """Replace ``path`` with ``text`` atomically; the bytes written."""
        # A random name, created exclusively: a file or symlink put there
        # beforehand is never written through.
        data = text.encode(errors="backslashreplace")  # a lone surrogate from a worker
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        return len(data)
