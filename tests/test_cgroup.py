"""Each rank's attempt in a cgroup of its own: nothing it started survives it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from aiotimer import _cgroup
from aiotimer._cgroup import JobCgroup, kill_cgroup

pytestmark = pytest.mark.slow

# A daemon that leaves everything a launcher could track it by: its process
# group and session (setsid), its environment (the job token), its parent
# (double fork: re-parented to init).
DAEMON = textwrap.dedent(
    """
    import os, sys, time
    r, w = os.pipe()  # close-on-exec: EOF once the daemon runs sleep
    if os.fork() == 0:
        os.setsid()
        if os.fork() == 0:
            os.execve("/bin/sleep", ["sleep", "300"], {})
        os._exit(0)
    os.close(w)
    os.wait()
    os.read(r, 1)
    print("ready", flush=True)
    time.sleep(300)
    """
)


def _job() -> JobCgroup:
    job = JobCgroup.create(f"aiotimer-test-{uuid.uuid4().hex[:8]}")
    if isinstance(job, str):
        pytest.skip(f"cgroup v2 is not usable here: {job}")
    return job


@pytest.fixture
def job() -> Iterator[JobCgroup]:
    job = _job()
    yield job
    job.close()


def _sleepers() -> set[int]:
    found = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if Path(f"/proc/{entry}/cmdline").read_bytes() == b"sleep\x00300\x00":
                    found.add(int(entry))
            except OSError:
                pass
    return found


def _until(predicate: object, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if callable(predicate) and predicate():
            return True
        time.sleep(0.02)
    return False


def test_a_daemon_that_left_the_process_group_and_the_token_dies_with_its_rank(
    job: JobCgroup,
) -> None:
    before = _sleepers()
    cgroup = job.rank(0, 0)
    worker = subprocess.Popen(
        JobCgroup.enter(cgroup, [sys.executable, "-c", DAEMON]), stdout=subprocess.PIPE
    )
    assert worker.stdout is not None and worker.stdout.readline() == b"ready\n"
    (daemon,) = _sleepers() - before
    assert Path(f"/proc/{daemon}/environ").read_bytes() == b""  # no token to find it by
    assert os.getsid(daemon) != os.getsid(worker.pid)
    assert worker.pid in map(int, (cgroup / "cgroup.procs").read_text().split())

    assert kill_cgroup(cgroup) == 2
    assert worker.wait(10) == -signal.SIGKILL
    assert _until(lambda: daemon not in _sleepers())
    assert not cgroup.exists()
    worker.stdout.close()


def test_the_keeper_kills_what_is_left_when_the_launcher_is_sigkilled(tmp_path: Path) -> None:
    _job().close()  # skips where cgroups cannot be used
    launcher = textwrap.dedent(
        f"""
        import subprocess, sys, time
        from aiotimer._cgroup import JobCgroup
        job = JobCgroup.create(sys.argv[1])
        worker = subprocess.Popen(
            JobCgroup.enter(job.rank(0, 0), [sys.executable, "-c", {DAEMON!r}]),
            stdout=subprocess.PIPE,
        )
        sys.stdout.write(worker.stdout.readline().decode() + str(job.path) + "\\n")
        sys.stdout.flush()
        time.sleep(300)
        """
    )
    before = _sleepers()
    name = f"aiotimer-test-{uuid.uuid4().hex[:8]}"
    proc = subprocess.Popen(
        [sys.executable, "-c", launcher, name],
        stdout=subprocess.PIPE,
        cwd=Path(__file__).parent.parent,
    )
    assert proc.stdout is not None
    try:
        assert proc.stdout.readline() == b"ready\n"
        path = Path(proc.stdout.readline().decode().strip())
        (daemon,) = _sleepers() - before
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
    assert _until(lambda: daemon not in _sleepers()), "the daemon outlived the launcher"
    assert _until(lambda: not path.exists()), f"{path} was left behind"


def test_where_cgroups_cannot_be_used_create_says_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A plain directory where the hierarchy should be: no cgroup.kill there.
    monkeypatch.setattr(_cgroup, "_cgroup2_mount", lambda: tmp_path)
    reason = JobCgroup.create("job")
    assert isinstance(reason, str) and "cgroup.kill" in reason
    assert not (tmp_path / "job").exists()  # nothing left behind


def test_no_cgroup_v2_mounted_is_a_reason_not_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def missing() -> Path:
        raise LookupError("no cgroup v2 hierarchy is mounted")

    monkeypatch.setattr(_cgroup, "_cgroup2_mount", missing)
    assert JobCgroup.create("job") == "no cgroup v2 hierarchy is mounted"


def test_a_bad_name_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match=r"`name` must be a plain directory name, got '\.\./x'"):
        JobCgroup.create("../x")


def test_killing_a_cgroup_that_is_gone_counts_nothing(tmp_path: Path) -> None:
    assert kill_cgroup(tmp_path / "gone") == 0


# -- the launcher: `aiotimer run` and `aiotimer serve` ------------------------------

# A rank that starts a daemon which leaves its process group, session, parent and
# environment (so no token finds it), writes the daemon's pid to argv[1], and exits
# (or, with argv[2] == "stay", sleeps).
RANK = textwrap.dedent(
    """
    import os, sys, time
    r, w = os.pipe()  # close-on-exec: EOF once the daemon runs sleep
    pr, pw = os.pipe()  # the daemon's pid
    if os.fork() == 0:
        os.setsid()
        daemon = os.fork()
        if daemon == 0:
            os.execve("/bin/sleep", ["sleep", "300"], {})
        os.write(pw, str(daemon).encode())
        os._exit(0)
    os.close(w)
    os.close(pw)
    os.wait()
    os.read(r, 1)
    daemon = os.read(pr, 64).decode()
    with open(sys.argv[1] + ".tmp", "w") as f:
        f.write(daemon)
    os.rename(sys.argv[1] + ".tmp", sys.argv[1])
    if sys.argv[2:] == ["stay"]:
        time.sleep(300)
    """
)


def _launch(tmp_path: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "aiotimer", *args],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _daemons(pidfile: Path) -> set[int]:
    assert _until(pidfile.exists), "the rank did not start its daemon"
    pids = {int(p) for p in pidfile.read_text().split()}
    assert pids, "no daemon found"
    return pids


def _cleanup(pids: set[int]) -> None:
    for pid in pids & _sleepers():
        os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("command", ["run", "serve"])
def test_what_a_rank_left_behind_dies_with_the_job(tmp_path: Path, command: str) -> None:
    _job().close()  # skips where cgroups cannot be used
    pidfile = tmp_path / "daemon.pid"
    proc = _launch(tmp_path, command, "--", sys.executable, "-c", RANK, str(pidfile))
    try:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        daemons = _daemons(pidfile)
        assert _until(lambda: not daemons & _sleepers()), "the daemon outlived the job"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        if pidfile.exists():
            _cleanup({int(p) for p in pidfile.read_text().split()})


def test_without_cgroups_such_a_daemon_escapes(tmp_path: Path) -> None:
    """What ``--no-cgroup`` (or an unprivileged user) leaves: the process groups and
    the token cannot find a daemon that left both (the reason for cgroups)."""
    pidfile = tmp_path / "daemon.pid"
    proc = _launch(tmp_path, "run", "--no-cgroup", "--", sys.executable, "-c", RANK, str(pidfile))
    daemons: set[int] = set()
    try:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        daemons = _daemons(pidfile)
        assert daemons <= _sleepers()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        _cleanup(daemons)


def test_a_sigkilled_launchers_ranks_leave_nothing_behind(tmp_path: Path) -> None:
    _job().close()
    pidfile = tmp_path / "daemon.pid"
    proc = _launch(tmp_path, "run", "--", sys.executable, "-c", RANK, str(pidfile), "stay")
    daemons: set[int] = set()
    try:
        daemons = _daemons(pidfile)
        proc.kill()  # no chance to clean up: the keeper does
        proc.communicate(timeout=60)
        assert _until(lambda: not daemons & _sleepers()), "the daemon outlived the launcher"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        _cleanup(daemons)
