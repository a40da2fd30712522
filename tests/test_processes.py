"""ProcessRegistry and entitlement: who is watched, who may be named, and exits forgotten once."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass

import pytest
from helpers import WAIT, until

from aiotimer._processes import (
    ProcessRegistry,
    WatchedProcess,
    descendant_of,
    foreign_descendant_of,
)

ME = os.getpid()


@dataclass
class Applicant:
    id: int = 1
    spawned: None = None
    refuse: str | None = None

    def entitled(self, pid: int) -> str | None:
        return self.refuse

    def tree_of(self, pid: int) -> int:
        return self.id  # one tree per applicant, for these tests


def registry() -> tuple[ProcessRegistry, list[WatchedProcess]]:
    exited: list[WatchedProcess] = []
    reg = ProcessRegistry(exited.append)
    reg.bind(asyncio.get_running_loop())
    return reg, exited


def test_descendants_of_the_server_are_entitled_and_others_not(
    sleeper: Callable[[], subprocess.Popen[bytes]],
) -> None:
    child = sleeper().pid
    roots = frozenset({ME})
    assert descendant_of(child, roots) is None
    assert descendant_of(ME, roots) is None
    assert "does not descend" in (descendant_of(1, roots) or "")
    assert "does not exist" in (descendant_of(2**22 + 11, roots) or "")
    assert "is the timer server itself" in (foreign_descendant_of(ME, roots) or "")
    assert foreign_descendant_of(child, roots) is None


async def test_admission_holds_a_pidfd_and_records_the_channel(
    sleeper: Callable[[], subprocess.Popen[bytes]],
) -> None:
    reg, _ = registry()
    pid = sleeper().pid
    process = reg.admit(Applicant(id=7), pid)
    assert isinstance(process, WatchedProcess)
    assert process.pidfd >= 0 and process.channels == {7}
    assert reg.admit(Applicant(id=8), pid) is process and process.channels == {7, 8}
    assert reg.by_pid[pid] is process and reg.by_id[process.id] is process
    reg.close()
    assert process.pidfd == -1 and len(reg) == 0


async def test_a_refused_or_missing_pid_is_not_watched() -> None:
    reg, _ = registry()
    assert reg.admit(Applicant(refuse="no, on purpose"), ME) == "no, on purpose"
    assert "does not exist" in str(reg.admit(Applicant(), 2**22 + 13))
    assert len(reg) == 0


async def test_an_exit_is_forgotten_in_one_place_and_reported_once(
    sleeper: Callable[[], subprocess.Popen[bytes]],
) -> None:
    reg, exited = registry()
    proc = sleeper()
    process = reg.watch(proc.pid)
    proc.kill()
    await until(lambda: bool(exited))
    assert exited == [process] and process.exited
    assert proc.pid not in reg.by_pid and process.id not in reg.by_id
    assert process.returncode == -9  # our child: its status is read, and left to its waiter
    assert proc.wait(timeout=WAIT) == -9
    process._exited()  # a second notice changes nothing
    assert exited == [process]


async def test_revalidation_sees_a_process_gone_before_the_loop_does(
    sleeper: Callable[[], subprocess.Popen[bytes]],
) -> None:
    reg, exited = registry()
    proc = sleeper()
    old = reg.admit(Applicant(), proc.pid)
    assert isinstance(old, WatchedProcess)
    proc.kill()
    proc.wait(timeout=WAIT)  # reaped: the pid may now be reused
    # No loop turn yet: the registry has not seen the exit ...
    assert not old.exited
    # ... but a revalidating admission asks the kernel, and forgets the old process.
    assert "does not exist" in str(reg.admit(Applicant(), proc.pid, revalidate=True))
    assert old.exited and exited == [old]


@pytest.mark.slow
async def test_the_exit_status_of_a_child_is_read_and_left_for_its_waiter() -> None:
    reg, exited = registry()
    code = "import sys; sys.stdin.read(); raise SystemExit(3)"
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE)
    reg.watch(proc.pid)
    assert proc.stdin is not None
    proc.stdin.close()
    await until(lambda: bool(exited))
    assert exited[0].returncode == 3
    assert proc.wait(timeout=WAIT) == 3


async def test_one_worker_tree_cannot_take_every_admission(
    sleeper: Callable[[], subprocess.Popen[bytes]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rank 0's children once took all admissions (half the fd limit), so rank 1's child
    hung unkilled; now a tree holds at most its fair share and the others still get in."""
    from aiotimer._processes import TREE_RESERVE

    reg, _ = registry()
    monkeypatch.setattr(reg, "_fd_budget", 48)
    greedy, modest = Applicant(id=1), Applicant(id=2)
    procs = [sleeper() for _ in range(40)]
    admitted = [reg.admit(greedy, p.pid) for p in procs[:39]]
    held = [a for a in admitted if not isinstance(a, str)]
    refused = [a for a in admitted if isinstance(a, str)]
    assert len(held) == max(TREE_RESERVE, 48 // 2)  # alone: half the budget, room for one more
    assert refused and "fair share" in refused[0] and "worker tree 1" in refused[0]
    late = reg.admit(modest, procs[39].pid)
    assert not isinstance(late, str), late  # another tree still gets in
    reg.close()
