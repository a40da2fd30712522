"""The ``aiotimer`` command's arguments and errors: one line, exit 2, never a traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import aiotimer

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent


def aiotimer_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "aiotimer", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["run", "-n", "0", "--", "true"], "-n must be >= 1, got 0"),
        (["run", "--signal", "NOPE", "--", "true"], "`--signal` must name a signal, got 'NOPE'"),
        (["run", "--grace", "-2", "--", "true"], "`--grace` must be a finite number of seconds"),
        (["run", "--restart-policy", "some", "--", "true"], "invalid choice: 'some'"),
        (["run"], "aiotimer run: error: a command to run is required after --"),
        (["run", "--"], "aiotimer run: error: a command to run is required after --"),
        (["run", "--", "no-such-program-xyz"], "no-such-program-xyz: command not found"),
        (["run", "--", "/dev/null"], "/dev/null: not an executable program"),
        (["serve", "--fifo", "/etc/hostname", "--", "true"], "exists and is not a FIFO"),
        (["serve", "--fifo", "/no/such/dir/f", "--", "true"], "no such directory"),
    ],
)
def test_usage_errors_are_one_line_exit_2_and_name_the_problem(
    args: list[str], message: str
) -> None:
    result = aiotimer_cli(*args)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "Traceback" not in result.stderr


def test_version_and_help() -> None:
    result = aiotimer_cli("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"aiotimer {aiotimer.__version__}"
    result = aiotimer_cli("run", "--help")
    assert result.returncode == 0
    for text in (
        "--nproc-per-node",
        "--max-restarts",
        "--restart-policy",
        "--stop-grace",
        "--log-dir",
        "124",
        "128+n",
        "--no-realtime",
    ):
        assert text in result.stdout


@pytest.mark.parametrize("spelling", ["--nproc_per_node", "--nproc-per-node", "-n"])
def test_torchruns_spellings_and_a_lowercase_log_level(spelling: str) -> None:
    code = "import os; print(os.environ['WORLD_SIZE'])"
    result = aiotimer_cli(
        "run",
        spelling,
        "2",
        "--max_restarts",
        "0",
        "--log-level",
        "info",
        "--",
        sys.executable,
        "-c",
        code,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("2\n") == 2
