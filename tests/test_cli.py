"""The `aiotimer run` launcher, end to end, as a user runs it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = str(ROOT / "examples" / "flaky_worker.py")


def aiotimer(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "aiotimer", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


def test_demo_kills_the_hung_ranks_and_restarts_them() -> None:
    result = aiotimer("run", "-n", "2", "--max-restarts", "1", "--", sys.executable, EXAMPLE)
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    assert "[rank1]: step 2: hanging (attempt 0)" in out
    assert "timer 'step' expired" in out and "sent SIGKILL to rank 1" in out
    assert "restarting rank 1 (restart 1 of 1)" in out
    assert "[rank1]: finished" in out and "[rank0]: finished" in out
    assert "rank 0: ok" in out
    assert "rank 1: ok after 1 restart; watchdog kills: attempt 0 in step" in out


def test_a_rank_still_hanging_after_its_restarts_exits_124() -> None:
    result = aiotimer("run", "-n", "2", "--", sys.executable, EXAMPLE)
    assert result.returncode == 124, result.stdout + result.stderr
    assert "rank 1: FAILED, killed by SIGKILL; watchdog kills: attempt 0 in step" in result.stdout


def test_a_rank_that_fails_on_its_own_exits_1() -> None:
    result = aiotimer("run", "-n", "1", "--", sys.executable, "-c", "raise SystemExit(3)")
    assert result.returncode == 1
    assert "rank 0: FAILED, exit status 3" in result.stdout


def test_ranks_get_torchrun_style_environment() -> None:
    code = (
        "import os; print(os.environ['RANK'], os.environ['LOCAL_RANK'], "
        "os.environ['WORLD_SIZE'], os.environ['AIOTIMER_RESTART_COUNT'])"
    )
    result = aiotimer("run", "-n", "3", "--", sys.executable, "-c", code)
    assert result.returncode == 0
    for rank in range(3):
        assert f"[rank{rank}]: {rank} {rank} 3 0" in result.stdout


def test_sigterm_with_grace_and_stack_dump_options() -> None:
    result = aiotimer(
        "run",
        "--signal",
        "TERM",
        "--grace",
        "1",
        "--dump-stacks",
        "--",
        sys.executable,
        "-c",
        "import aiotimer, time\nwith aiotimer.expires(after=0.3, scope='s'):\n    time.sleep(60)",
    )
    assert result.returncode == 124
    assert "sent SIGTERM to rank 0" in result.stdout
    assert "Current thread" in result.stdout or "Thread 0x" in result.stdout  # the stack dump
    assert "killed by SIGTERM" in result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["run", "-n", "0", "--", "true"], "-n must be >= 1, got 0"),
        (["run", "--signal", "NOPE", "--", "true"], "`--signal` must name a signal, got 'NOPE'"),
        (["run", "--grace", "-2", "--", "true"], "`--grace` must be a finite number of seconds"),
        (["run"], "a command to run is required"),
    ],
)
def test_bad_arguments_exit_2_naming_the_problem(args: list[str], message: str) -> None:
    result = aiotimer(*args)
    assert result.returncode == 2
    assert message in result.stderr
