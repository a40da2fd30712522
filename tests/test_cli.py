"""The ``aiotimer`` command's arguments and errors: one line, exit 2, never a traceback."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import aiotimer

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent


def aiotimer_cli(
    *args: str, timeout: float = 120, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "aiotimer", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env=env,
    )


def one_line_exit_2(result: subprocess.CompletedProcess[str], message: str) -> None:
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "Traceback" not in result.stderr


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
        (["run", "--metrics-linger", "5", "--", "true"], "--metrics-linger needs --metrics-port"),
        (["run", "--bogus", "--", "true"], "aiotimer run: error: unrecognized arguments: --bogus"),
        (["serve", "--bogus", "--", "true"], "aiotimer serve: error: unrecognized arguments"),
        (["--bogus", "run", "--", "true"], "aiotimer: error: unrecognized arguments: --bogus"),
        (["serve", "--fifo", "/etc/hostname", "--", "true"], "exists and is not a FIFO"),
        (["serve", "--fifo", "/no/such/dir/f", "--", "true"], "no such directory"),
        (["run", "--nnodes", "x", "--", "true"], "--nnodes must be N or MIN:MAX with 0 < MIN"),
        (["run", "--nnodes=0:1", "--", "true"], "0 < MIN <= MAX, got '0:1'"),
        (["run", "--nnodes=1:2:3", "--", "true"], "0 < MIN <= MAX, got '1:2:3'"),
        (["run", "--run-id=", "--", "true"], "--run-id must be a non-empty printable string"),
        (["run", "--max-incidents", "-1", "--", "true"], "--max-incidents must be >= 0, got -1"),
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


@pytest.mark.parametrize("command", ["run", "serve"])
def test_an_event_loop_that_is_not_asyncios_is_one_line(command: str) -> None:
    """Issue 23, item 8: the error was followed by "coroutine ... was never awaited"."""
    result = aiotimer_cli(command, "--", "true", env=dict(os.environ, AIOTIMER_LOOP="trio"))
    one_line_exit_2(
        result,
        f"aiotimer {command}: error: AIOTIMER_LOOP must be one of asyncio, uvloop, got 'trio' "
        "(the watchdog runs on an asyncio event loop)",
    )
    assert "never awaited" not in result.stderr


@pytest.mark.parametrize("command", ["run", "serve"])
def test_every_metrics_flag_error_is_one_line_and_exit_2(command: str, tmp_path: Path) -> None:
    """Issue 23, item 4: each of these ended in a traceback and exit 1."""
    true = ["--", "true"]
    one_line_exit_2(
        aiotimer_cli(command, "--metrics-port", "99999", *true),
        f"aiotimer {command}: error: argument --metrics-port: --metrics-port must be a port "
        "number, 0-65535 (0: any free port), got '99999'",
    )
    with socket.socket() as taken:  # another job on this node serves its metrics there
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        one_line_exit_2(
            aiotimer_cli(command, "--metrics-port", str(port), *true),
            f"--metrics-host 127.0.0.1 --metrics-port {port}: cannot serve metrics there "
            "(Address already in use)",
        )
    # TEST-NET-1: an address that is no interface's here.
    one_line_exit_2(
        aiotimer_cli(command, "--metrics-host", "192.0.2.1", "--metrics-port", "0", *true),
        "--metrics-host 192.0.2.1 --metrics-port 0: cannot serve metrics there (Cannot assign",
    )
    # prometheus_client missing: a module of that name that cannot be imported comes first.
    shadow = tmp_path / "shadow"
    shadow.mkdir()
    (shadow / "prometheus_client.py").write_text("raise ImportError('not installed')\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(shadow), str(ROOT)]))
    one_line_exit_2(
        aiotimer_cli(command, "--metrics-port", "0", *true, env=env),
        "--metrics-port needs prometheus_client (not installed): pip install 'aiotimer[metrics]'",
    )


@pytest.mark.parametrize(
    ("kind", "message"),
    [("FIFO", "is a FIFO of another user (uid 65534)"), ("file", "exists and is not a FIFO")],
)
def test_serve_on_a_path_another_user_owns_is_one_line_exit_2(
    tmp_path: Path, kind: str, message: str
) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to make a file of another user")
    taken = tmp_path / "timer.fifo"
    if kind == "FIFO":
        os.mkfifo(taken)
    else:
        taken.write_text("theirs")
    os.chown(taken, 65534, 65534)
    result = aiotimer_cli("serve", "--fifo", str(taken), "--", "true")
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert os.lstat(taken).st_uid == 65534  # theirs, left alone


def test_serves_default_fifo_is_in_a_private_directory_removed_on_exit(tmp_path: Path) -> None:
    # A fixed default name in /tmp, taken first by another user, made serve exit
    # with a traceback (and another user's FIFO could have been written into).
    seen = tmp_path / "seen"
    code = (
        "import os, stat, sys; p = os.environ['TORCHELASTIC_TIMER_FILE']; "
        "open(sys.argv[1], 'w').write(' '.join(map(str, (p, "
        "oct(stat.S_IMODE(os.lstat(os.path.dirname(p)).st_mode)), "
        "stat.S_ISFIFO(os.lstat(p).st_mode)))))"
    )
    result = aiotimer_cli("serve", "--", sys.executable, "-c", code, str(seen))
    assert result.returncode == 0, result.stderr
    path, mode, is_fifo = seen.read_text().split()
    assert mode == "0o700" and is_fifo == "True"
    assert not os.path.exists(os.path.dirname(path))


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
        "--run-id",
        "--standalone",
        "--nnodes",
        "error.json",
    ):
        assert text in result.stdout


@pytest.mark.parametrize("nnodes", ["2", "1:2", "4:4"])
def test_more_than_one_node_is_refused_pointing_to_serve_and_torchrun(nnodes: str) -> None:
    """Issue 20, item 6: `run` is single-host; torchrun under `serve` spans nodes."""
    one_line_exit_2(
        aiotimer_cli("run", "--standalone", f"--nnodes={nnodes}", "--", "true"),
        f"aiotimer run: error: argument --nnodes: aiotimer run starts every rank on this host, "
        f"got --nnodes {nnodes}; for a multi-node job, watch torchrun's ranks on each node: "
        f"aiotimer serve -- torchrun --nnodes {nnodes} ...",
    )


def test_torchruns_single_node_flags_are_accepted() -> None:
    """`--standalone`, `--nnodes=1`, `--nnodes 1:1` and `--run_id`, as a torchrun line has them."""
    code = "import os; print(os.environ['TORCHELASTIC_RUN_ID'])"
    result = aiotimer_cli(
        "run", "--standalone", "--nnodes=1", "--nnodes", "1:1", "--run_id", "r1", "-n", "2",
        "--", sys.executable, "-c", code,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("r1\n") == 2, result.stdout


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


@pytest.mark.slow
def test_max_incidents_keeps_the_newest_of_ours_and_no_other_file(tmp_path: Path) -> None:
    """Issue 18, item 6: ``--max-incidents N`` rotates the directory, oldest of ours first."""
    incidents = tmp_path / "inc"
    incidents.mkdir()
    for n in range(3):  # three old incidents of an earlier job
        for suffix in ("json", "txt"):
            old = incidents / f"incident-20200101T00000{n}-pid1-1-{n}.{suffix}"
            old.write_text("{}" if suffix == "json" else "old\n")
            os.utime(old, (1.6e9 + n, 1.6e9 + n))
    (incidents / "notes.txt").write_text("mine\n")
    code = "import time, aiotimer\nwith aiotimer.expires(after=0.2):\n    time.sleep(60)"
    result = aiotimer_cli(
        "run", "--max-incidents", "2", "--dump-timeout", "0", "--incident-dir", str(incidents),
        "--", sys.executable, "-c", code,
    )  # fmt: skip
    assert result.returncode != 0, result.stderr
    kept = sorted(p.name for p in incidents.glob("incident-*.json"))
    assert len(kept) == 2 and kept[0] == "incident-20200101T000002-pid1-1-2.json", kept
    assert (incidents / "notes.txt").read_text() == "mine\n"  # never another file
    assert "is over its budget (2 incidents" in result.stderr, result.stderr
