"""`aiotimer run` as schedulers, shells and torch users run it: real processes, both loops."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import pytest

from aiotimer._loops import available_loops

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = str(ROOT / "examples" / "flaky_worker.py")
LOOPS = sorted(available_loops())
WAIT = 120.0


@pytest.fixture(params=LOOPS)
def loop(request: pytest.FixtureRequest) -> str:
    """The loop the launcher runs on (AIOTIMER_LOOP)."""
    return str(request.param)


@pytest.fixture
def marker() -> Iterator[str]:
    """A string that marks this test's processes, so none can be left unnoticed."""
    mark = f"aiotimer-test-{uuid.uuid4().hex}"
    workdir(mark).mkdir()
    yield mark
    shutil.rmtree(workdir(mark), ignore_errors=True)
    left = processes_with(mark)
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert not left, f"processes left behind: {left}"


def workdir(mark: str) -> Path:
    """Where the launcher runs (its incidents go to ./aiotimer-incidents there)."""
    return Path(tempfile.gettempdir()) / mark


def processes_with(mark: str) -> list[int]:
    """Live (not zombie) processes whose command line or environment holds ``mark``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
            blob = (entry / "cmdline").read_bytes() + (entry / "environ").read_bytes()
        except OSError:
            continue
        if mark.encode() in blob and state != "Z":
            found.append(int(entry.name))
    return found


def launcher(
    loop: str,
    marker: str,
    *args: str,
    code: str | None = None,
    text: bool = True,
    wrapper: Sequence[str] = (),
    environ: Mapping[str, str | None] | None = None,
    **kwargs: object,
) -> subprocess.Popen[str]:
    """``aiotimer run ARGS`` (``-- python -c CODE``); ``environ``: changes (None: unset)."""
    argv = [*wrapper, sys.executable, "-m", "aiotimer", "run", *args]
    if code is not None:
        argv += ["--", sys.executable, "-c", textwrap.dedent(code)]
    env = dict(os.environ, AIOTIMER_LOOP=loop, MARKER=marker, PYTHONPATH=str(ROOT))
    # The job's private directories (a failed rank's error file is kept) go with the test's.
    env["TMPDIR"] = str(workdir(marker))
    for name, value in (environ or {}).items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    return subprocess.Popen(  # type: ignore[call-overload, no-any-return]
        argv,
        env=env,
        text=text,
        cwd=workdir(marker),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        **kwargs,
    )


def finish(proc: subprocess.Popen[str]) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=WAIT)
    return proc.returncode, out, err


def wait_for_lines(proc: subprocess.Popen[str], count: int) -> list[str]:
    assert proc.stdout is not None
    return [proc.stdout.readline() for _ in range(count)]


# -- the demo and exit statuses ------------------------------------------------------


def test_the_readmes_demo_does_what_the_readme_says(loop: str, marker: str) -> None:
    """`aiotimer run -n 4 --max-restarts 1 -- python examples/flaky_worker.py`: rank 1 hangs
    once; it is killed at its deadline and explained, with every rank's stacks, and the group
    is restarted and finishes (issue 23, item 8: the README said two ranks hang and are
    killed, and the group restart often stopped the second before its deadline)."""
    proc = launcher(loop, marker, "-n", "4", "--max-restarts", "1", "--", sys.executable, EXAMPLE)
    code, out, err = finish(proc)
    assert code == 0, out + err
    assert "[rank1]: step 2: hanging (attempt 0)" in out
    # Each watchdog event once, on stderr; never on stdout, never twice.
    assert err.count("timer 'step' expired") == 1 and err.count("sent SIGKILL to rank 1") == 1
    assert "timer 'step' expired" not in out
    (incident,) = [line for line in err.splitlines() if "incident:" in line]
    assert "rank 1 (pid" in incident and "hung in 'step'" in incident
    text = Path(incident.split("incident: ")[1]).read_text()
    assert text.count("wait_for_the_other_ranks") == 3  # every other rank's stacks too
    # The watchdog wrote torch's error file into rank 1's own (issue 20, item 6), and it is
    # still where the incident says, though the job ended well.
    wrote = re.search(r"- wrote (\S+/attempt_0/1/error\.json)\n", text)
    assert wrote and "watchdog timeout" in Path(wrote[1]).read_text(), text
    assert "restarting all 4 ranks (restart 1 of 1)" in err
    assert out.count("finished") == 4 and "[rank0]: step 0 done (attempt 1)" in out
    assert "rank 1: ok after 1 restart; watchdog kills: attempt 0 in step" in err


def test_a_hung_worker_that_exits_0_on_sigterm_is_still_a_watchdog_exit(
    loop: str, marker: str
) -> None:
    proc = launcher(
        loop,
        marker,
        "--signal",
        "TERM",
        code="""
            import signal, sys, time, aiotimer
            signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
            with aiotimer.expires(after=0.3, scope="stuck"):
                time.sleep(60)
        """,
    )
    code, _, err = finish(proc)
    assert code == 124, err
    assert "rank 0: FAILED, its watchdog fired, then exit status 0" in err


IGNORES_SIGTERM = """
    import signal, time, aiotimer
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    with aiotimer.expires(after=0.3, scope="stubborn"):
        time.sleep(60)
"""


def test_an_escalation_is_printed_once(loop: str, marker: str) -> None:
    """Issue 23, item 7: SIGTERM, the grace, SIGKILL was printed twice, in two formats."""
    proc = launcher(loop, marker, "--signal", "TERM", "--grace", "1", code=IGNORES_SIGTERM)
    code, _, err = finish(proc)
    assert code == 124, err
    assert err.count("sent SIGTERM to rank 0 (pid") == 1, err
    assert err.split("aiotimer: summary")[0].count("SIGKILL") == 1, err  # the escalation's
    escalation = r"rank 0 \(pid \d+\) still running \d\.\d\ds after the deadline: sent SIGKILL"
    assert re.search(escalation, err), err
    assert "still alive" not in err, err


# A served job's ranks: an agent's children, as torchrun's are, speaking torch's FIFO protocol.
RANK_1_STUCK = """
import json, os, signal, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)  # as a worker stuck in C code
line = json.dumps({"version": 1, "pid": os.getpid(), "scope_id": "stuck",
                   "expiration_time": time.time() + 0.3, "signal": 15})
with open(os.environ["TORCHELASTIC_TIMER_FILE"], "w") as fifo:
    fifo.write(line + "\\n")
time.sleep(60)
"""
AGENT = f"""
import os, subprocess, sys
codes = (("0", "import time; time.sleep(60)"), ("1", {RANK_1_STUCK!r}))
ranks = [subprocess.Popen([sys.executable, "-c", code], env={{**os.environ, "RANK": r}})
         for r, code in codes]
ranks[1].wait()
ranks[0].kill()
"""


def test_serve_names_the_rank_in_each_line_and_prints_each_once(loop: str, marker: str) -> None:
    """Issue 23, item 7: serve's lines said "timer of pid N expired", without the rank."""
    env = dict(os.environ, AIOTIMER_LOOP=loop, MARKER=marker, PYTHONPATH=str(ROOT))
    result = subprocess.run(
        [sys.executable, "-m", "aiotimer", "serve", "--grace", "1", "--",
         sys.executable, "-c", AGENT],
        env=env, cwd=workdir(marker), capture_output=True, text=True, timeout=WAIT,
    )  # fmt: skip
    err = result.stderr
    assert result.returncode == 0, err
    pid = re.search(r"rank 1 \(pid (\d+)\): timer 'stuck' expired", err)
    assert pid, err
    who = f"rank 1 (pid {pid.group(1)})"
    assert err.count(f"{who}: timer 'stuck' expired") == 1, err
    assert err.count(f"sent SIGTERM to {who}") == 1, err
    assert err.count(f"{who} hung in 'stuck'") == 1, err
    assert err.count(f"{who} still running") == 1, err
    assert "timer of pid" not in err and "still alive" not in err, err


@pytest.mark.parametrize("flags", [[], ["--realtime"], ["--no-realtime"]])
def test_realtime_near_deadlines_by_default_where_permitted_never_for_ranks(
    loop: str, marker: str, flags: list[str], realtime_permitted: bool
) -> None:
    proc = launcher(
        loop,
        marker,
        "--log-level",
        "info",
        *flags,
        code="""
            import os, time, aiotimer
            print("policy", os.sched_getscheduler(0), flush=True)
            with aiotimer.expires(after=0.3, scope="stuck"):
                time.sleep(60)
        """,
    )
    code, out, err = finish(proc)
    assert code == 124, err
    assert f"policy {os.SCHED_OTHER}" in out  # the rank never inherits the priority
    assert "timer 'stuck' expired" in err
    boosted = "real-time near deadlines" in err
    assert boosted == (realtime_permitted and flags != ["--no-realtime"]), err
    if not realtime_permitted and flags == ["--realtime"]:
        assert "WARNING: real-time priority is not permitted" in err
    assert "Traceback" not in err


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv (util-linux)")
@pytest.mark.parametrize(("flags", "level"), [([], "INFO"), (["--realtime"], "WARNING")])
def test_without_the_privilege_realtime_is_said_once_and_the_job_runs(
    loop: str, marker: str, flags: list[str], level: str
) -> None:
    # Without CAP_SYS_NICE (and RLIMIT_RTPRIO 0) SCHED_RR is refused, even to root.
    no_nice = ["setpriv", "--bounding-set=-sys_nice", "--inh-caps=-sys_nice", "--"]
    proc = launcher(
        loop,
        marker,
        "--log-level",
        "info",
        *flags,
        wrapper=no_nice,
        code="""
            import time, aiotimer
            with aiotimer.expires(after=0.3, scope="stuck"):
                time.sleep(60)
        """,
    )
    code, _, err = finish(proc)
    assert code == 124, err
    assert err.count(f"{level}: real-time priority is not permitted") == 1, err
    assert "real-time near deadlines" not in err and "Traceback" not in err


def test_a_rank_that_fails_on_its_own_exits_1(loop: str, marker: str) -> None:
    code, _, err = finish(launcher(loop, marker, code="raise SystemExit(3)"))
    assert code == 1 and "rank 0: FAILED, exit status 3" in err
    # The root cause, without an error file: how to have one (issue 20, item 6).
    cause = err[err.index("Root cause:") :].splitlines()
    assert re.fullmatch(
        r"Root cause: rank 0 \(pid \d+\), attempt 0, the first to fail: exit status 3", cause[0]
    ), err
    assert cause[1].startswith(
        "    no error file: decorate the worker's entry point with torch's @record"
    ), err
    assert len(cause) == 2, err


def test_a_rank_stopped_because_another_failed_is_stopped_not_failed(
    loop: str, marker: str
) -> None:
    """Issue 20, item 6: ranks the group stop took down were listed as FAILED."""
    proc = launcher(
        loop,
        marker,
        "-n",
        "3",
        code="""
            import os, signal, sys, time
            rank = os.environ["RANK"]
            if rank == "1":
                while not (os.path.exists("ready0") and os.path.exists("ready2")):
                    time.sleep(0.01)
                sys.exit(3)
            if rank == "0":  # exits 4 on SIGTERM: still stopped, not failed
                signal.signal(signal.SIGTERM, lambda *a: sys.exit(4))
            open(f"ready{rank}", "w").close()
            time.sleep(60)
        """,
    )
    code, _, err = finish(proc)
    assert code == 1, err
    assert "rank 0: stopped (group stop after rank 1 failed), exit status 4\n" in err, err
    assert "rank 1: FAILED, exit status 3\n" in err, err
    assert "rank 2: stopped (group stop after rank 1 failed), killed by SIGTERM\n" in err, err
    assert err.count("FAILED") == 1, err
    assert re.search(
        r"Root cause: rank 1 \(pid \d+\), attempt 0, the first to fail: exit status 3", err
    )


def test_group_restart_gives_every_rank_torchruns_environment(loop: str, marker: str) -> None:
    proc = launcher(
        loop,
        marker,
        "-n",
        "2",
        "--max-restarts",
        "1",
        code="""
            import os, sys, time, aiotimer
            e = os.environ
            print(e["RANK"], e["LOCAL_RANK"], e["GROUP_RANK"], e["WORLD_SIZE"],
                  e["LOCAL_WORLD_SIZE"], e["AIOTIMER_RESTART_COUNT"],
                  e["TORCHELASTIC_RESTART_COUNT"], e["TORCHELASTIC_MAX_RESTARTS"],
                  e["MASTER_ADDR"], int(e["MASTER_PORT"]) > 0, flush=True)
            if e["RANK"] == "1" and e["AIOTIMER_RESTART_COUNT"] == "0":
                with aiotimer.expires(after=0.3):
                    time.sleep(60)
        """,
    )
    code, out, err = finish(proc)
    assert code == 0, err
    for rank in (0, 1):
        for attempt in (0, 1):
            line = f"[rank{rank}]: {rank} {rank} 0 2 2 {attempt} {attempt} 1 127.0.0.1 True"
            assert line in out, out


def test_the_rank_policy_restarts_only_the_killed_rank(loop: str, marker: str) -> None:
    proc = launcher(
        loop,
        marker,
        "-n",
        "2",
        "--max-restarts",
        "1",
        "--restart-policy",
        "rank",
        "--",
        sys.executable,
        EXAMPLE,
    )
    code, out, err = finish(proc)
    assert code == 0, err
    assert "restarting rank 1 (restart 1 of 1)" in err
    assert "[rank0]: step 0 done (attempt 1)" not in out
    assert "rank 0: ok\n" in err


# -- stopping --------------------------------------------------------------------------


STUBBORN = """
    import os, signal, sys, time
    if os.environ["RANK"] == "1":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # needs the SIGKILL after the grace
    if os.fork() == 0:  # a daemon grandchild, in a session of its own
        os.setsid()
        if os.fork() == 0:
            time.sleep(600)
        os._exit(0)
    print("ready", flush=True)
    time.sleep(600)
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT, signal.SIGQUIT])
def test_a_stop_signal_stops_every_rank_and_descendant(
    loop: str, marker: str, sig: signal.Signals
) -> None:
    proc = launcher(loop, marker, "-n", "2", "--stop-grace", "0.5", code=STUBBORN)
    # Both ranks started (in either order: they are separate processes).
    assert sorted(wait_for_lines(proc, 2)) == ["[rank0]: ready\n", "[rank1]: ready\n"]
    time.sleep(0.2)
    proc.send_signal(sig)
    code, _, err = finish(proc)
    assert code == 128 + sig, err
    assert f"got {sig.name}" in err and "summary" in err
    # Stopped by the launcher, not failed (issue 20, item 6); rank 1 needed the SIGKILL.
    assert f"rank 0: stopped (the launcher got {sig.name}), killed by SIGTERM" in err, err
    assert f"rank 1: stopped (the launcher got {sig.name}), killed by SIGKILL" in err, err
    assert err.rstrip().endswith(f"Root cause: the launcher got {sig.name}"), err
    assert "FAILED" not in err and "Traceback" not in err
    assert processes_with(marker) == []


def test_a_sigkilled_launcher_takes_its_workers_with_it(loop: str, marker: str) -> None:
    proc = launcher(
        loop,
        marker,
        "-n",
        "2",
        code="""
            import time
            print("ready", flush=True)
            time.sleep(600)
        """,
    )
    wait_for_lines(proc, 2)
    workers = processes_with(marker)
    proc.kill()
    finish(proc)
    deadline = time.monotonic() + 10  # the kernel does it at once; the goal is 1 s
    while processes_with(marker) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert workers and processes_with(marker) == []


def test_a_closed_stdout_ends_the_job_quietly(loop: str, marker: str) -> None:
    code = "import itertools\nfor i in itertools.count(): print('line', i, flush=True)"
    env = dict(os.environ, AIOTIMER_LOOP=loop, MARKER=marker)
    head = subprocess.run(
        f"{sys.executable} -m aiotimer run -- {sys.executable} -c {shlex.quote(code)} | head -n 3",
        shell=True,
        capture_output=True,
        text=True,
        env=dict(env, PYTHONPATH=str(ROOT)),
        cwd=workdir(marker),
        timeout=WAIT,
    )
    assert head.stdout.splitlines() == ["[rank0]: line 0", "[rank0]: line 1", "[rank0]: line 2"]
    assert "Traceback" not in head.stderr and "BrokenPipe" not in head.stderr
    assert processes_with(marker) == []


# -- descendants ---------------------------------------------------------------------


def test_a_daemonised_grandchild_is_killed_and_never_waited_for(loop: str, marker: str) -> None:
    started = time.monotonic()
    proc = launcher(
        loop,
        marker,
        code="""
            import os, time
            if os.fork() == 0:
                os.setsid()
                if os.fork() == 0:
                    time.sleep(600)   # holds stdout and stderr open
                os._exit(0)
            print("done", flush=True)
        """,
    )
    code, out, err = finish(proc)
    assert code == 0, err
    assert out == "[rank0]: done\n"
    assert time.monotonic() - started < 60
    assert processes_with(marker) == []


def test_an_orphaned_descendant_that_hangs_is_killed_and_tied_to_its_rank(
    loop: str, marker: str
) -> None:
    proc = launcher(
        loop,
        marker,
        code="""
            import os, time, aiotimer
            if os.fork() == 0:
                if os.fork() == 0:          # re-parented once its parent exits
                    time.sleep(0.3)
                    with aiotimer.expires(after=0.3, scope="orphan"):
                        time.sleep(600)
                    os._exit(0)
                os._exit(0)
            time.sleep(3)
            print("done", flush=True)
        """,
    )
    code, _, err = finish(proc)
    assert code == 0, err
    assert "rank 0's descendant pid" in err and "timer 'orphan' expired" in err
    assert "sent SIGKILL to rank 0's descendant pid" in err
    assert processes_with(marker) == []


# -- output ---------------------------------------------------------------------------


def test_long_lines_and_progress_bars_pass_through_intact(loop: str, marker: str) -> None:
    proc = launcher(
        loop,
        marker,
        code="""
            import sys, time
            print("x" * 300_000, flush=True)
            for p in (10, 50, 100):
                sys.stdout.write(f"\\r{p}%"); sys.stdout.flush(); time.sleep(0.05)
            print(flush=True)
            print("to stderr", file=sys.stderr, flush=True)
        """,
        text=False,  # as bytes: text mode would turn "\r" into "\n"
    )
    code, raw_out, raw_err = finish(proc)
    out, err = bytes(raw_out).decode(), bytes(raw_err).decode()  # type: ignore[arg-type]
    assert code == 0, err
    assert "[rank0]: " + "x" * 300_000 + "\n" in out
    assert "\r[rank0]: 10%\r[rank0]: 50%\r[rank0]: 100%\n" in out
    assert "[rank0]: to stderr\n" in err and "to stderr" not in out


def test_log_dir_keeps_each_ranks_output_per_attempt(
    loop: str, marker: str, tmp_path: Path
) -> None:
    proc = launcher(
        loop,
        marker,
        "-n",
        "2",
        "--max-restarts",
        "1",
        "--log-dir",
        str(tmp_path),
        "--",
        sys.executable,
        EXAMPLE,
    )
    code, out, _ = finish(proc)
    assert code == 0
    assert "hanging (attempt 0)" in (tmp_path / "attempt_0" / "1" / "stdout.log").read_text()
    assert "finished" in (tmp_path / "attempt_1" / "0" / "stdout.log").read_text()
    assert (tmp_path / "attempt_1" / "1" / "stderr.log").exists()
    assert "[rank1]: finished" in out  # still relayed


def test_workers_inherit_only_their_stdio_and_request_pipe(loop: str, marker: str) -> None:
    extra = os.open(os.devnull, os.O_RDONLY)
    os.set_inheritable(extra, True)  # an inheritable fd of the launcher's caller
    try:
        proc = launcher(
            loop,
            marker,
            code="""
                import os
                fds = sorted(int(f) for f in os.listdir("/proc/self/fd"))
                print(fds, os.environ["AIOTIMER_FD"], flush=True)
            """,
            pass_fds=(extra,),
        )
        code, out, err = finish(proc)
    finally:
        os.close(extra)
    assert code == 0, err
    fds, pipe_fd = out.split(": ", 1)[1].rsplit(" ", 1)
    allowed = {0, 1, 2, int(pipe_fd)}
    listed = eval(fds)  # the fd listdir itself used is one more, at the lowest free number
    assert len(set(listed) - allowed) <= 1, (listed, allowed)


# -- torch -------------------------------------------------------------------------------


@pytest.mark.torch
@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="needs torch")
def test_a_gloo_job_whose_rank_hangs_once_is_restarted_as_a_group_and_finishes(
    marker: str,
) -> None:
    code = """
        import os, time, torch, torch.distributed as dist, aiotimer
        dist.init_process_group("gloo")
        rank, attempt = dist.get_rank(), int(os.environ["TORCHELASTIC_RESTART_COUNT"])
        t = torch.ones(1)
        with aiotimer.expires(after=5, scope="all_reduce"):
            if rank == 1 and attempt == 0:
                time.sleep(600)              # never joins the collective
            dist.all_reduce(t)
        print(f"rank {rank} attempt {attempt} sum {t.item():.0f}", flush=True)
        dist.destroy_process_group()
    """
    proc = launcher(
        LOOPS[-1], marker, "-n", "2", "--max-restarts", "1", "--stop-grace", "2", code=code
    )
    status, out, err = finish(proc)
    assert status == 0, out + err
    assert "rank 0 attempt 1 sum 2" in out and "rank 1 attempt 1 sum 2" in out
    assert "timer 'all_reduce' expired" in err and "restarting all 2 ranks" in err


# -- torchrun parity (issue 20, item 6) -----------------------------------------------------

SHOW_ENV = """
    import json, os, stat
    e = os.environ
    path = e.get("TORCHELASTIC_ERROR_FILE")
    top = os.path.dirname(os.path.dirname(os.path.dirname(path))) if path else None
    print(json.dumps({
        "rank": e["RANK"], "run_id": e.get("TORCHELASTIC_RUN_ID"),
        "omp": e.get("OMP_NUM_THREADS"), "error_file": path,
        "dir_exists": bool(path) and os.path.isdir(os.path.dirname(path)),
        "file_exists": bool(path) and os.path.exists(path),
        "top": top, "top_mode": oct(stat.S_IMODE(os.stat(top).st_mode)) if top else None,
    }), flush=True)
"""


def shown(out: str) -> dict[str, dict[str, object]]:
    """What each rank of SHOW_ENV printed, by rank."""
    found = [json.loads(line.split(": ", 1)[1]) for line in out.splitlines()]
    return {str(info["rank"]): info for info in found}


def test_every_rank_gets_a_run_id_its_own_error_file_and_one_omp_thread(
    loop: str, marker: str
) -> None:
    proc = launcher(
        loop, marker, "-n", "2", "--run-id", "job-7", code=SHOW_ENV,
        environ={"OMP_NUM_THREADS": None, "TORCHELASTIC_ERROR_FILE": "/outer/error.json"},
    )  # fmt: skip
    code, out, err = finish(proc)
    assert code == 0, err
    ranks = shown(out)
    assert {r["run_id"] for r in ranks.values()} == {"job-7"}
    assert {r["omp"] for r in ranks.values()} == {"1"}
    # One file per rank and attempt, in a private directory of the job's, made beforehand
    # and empty (torch's @record writes it; so does the watchdog), never an outer one.
    for rank, info in ranks.items():
        assert str(info["error_file"]).endswith(f"/attempt_0/{rank}/error.json"), info
        assert info["dir_exists"] and not info["file_exists"], info
    top = ranks["0"]["top"]
    assert top == ranks["1"]["top"] and ranks["0"]["top_mode"] == "0o700", ranks
    assert not os.path.exists(str(top))  # nothing failed: nothing kept
    # torchrun's notice, once.
    notice = "OMP_NUM_THREADS is not set: setting it to 1 for every rank, so that 2 ranks"
    assert err.count(notice) == 1, err
    assert "summary of run job-7" in err and "Root cause" not in err


@pytest.mark.parametrize(("ranks", "omp"), [("2", "4"), ("1", None)])
def test_omp_num_threads_is_left_alone_when_set_or_for_one_rank(
    loop: str, marker: str, ranks: str, omp: str | None
) -> None:
    proc = launcher(loop, marker, "-n", ranks, code=SHOW_ENV, environ={"OMP_NUM_THREADS": omp})
    code, out, err = finish(proc)
    assert code == 0, err
    shown_ranks = shown(out)
    assert {r["omp"] for r in shown_ranks.values()} == {omp}
    assert "OMP_NUM_THREADS" not in err
    # No --run-id: a new uuid, the same for every rank, as torchrun --standalone makes.
    (run_id,) = {str(r["run_id"]) for r in shown_ranks.values()}
    assert str(uuid.UUID(run_id)) == run_id and f"summary of run {run_id}" in err


def test_a_relative_log_dir_gives_every_rank_an_absolute_error_file(loop: str, marker: str) -> None:
    """A rank may change directory, and the watchdog writes only to an absolute path."""
    code, out, err = finish(launcher(loop, marker, "-n", "2", "--log-dir", "logs", code=SHOW_ENV))
    assert code == 0, err
    for rank, info in shown(out).items():
        expected = workdir(marker) / "logs" / "attempt_0" / rank / "error.json"
        assert info["error_file"] == str(expected) and info["dir_exists"], info


RECORD_RAISES = """
    import os, sys, time
    if os.environ["RANK"] == "1":
        from torch.distributed.elastic.multiprocessing.errors import record

        @record
        def main() -> None:
            raise ValueError(f"bad batch 17 (attempt {os.environ['TORCHELASTIC_RESTART_COUNT']})")

        main()
    time.sleep(60)
"""


@pytest.mark.torch
@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="needs torch")
def test_a_record_decorated_rank_that_raises_is_the_root_cause(
    loop: str, marker: str, tmp_path: Path
) -> None:
    stale = tmp_path / "attempt_0" / "0" / "error.json"  # an earlier job's, in the same --log-dir
    stale.parent.mkdir(parents=True)
    stale.write_text('{"message": {"message": "OldError: not this job"}}')
    proc = launcher(
        loop, marker, "-n", "2", "--max-restarts", "1", "--log-dir", str(tmp_path),
        code=RECORD_RAISES,
    )  # fmt: skip
    code, _, err = finish(proc)
    assert code == 1, err
    assert "restarting all 2 ranks (restart 1 of 1): rank 1 failed, exit status 1" in err, err
    summary = err[err.index("aiotimer: summary of run") :].splitlines()
    error_file = tmp_path / "attempt_1" / "1" / "error.json"
    assert summary[1:3] == [
        "  rank 0: stopped (group stop after rank 1 failed), killed by SIGTERM after 1 restart",
        "  rank 1: FAILED, exit status 1 after 1 restart",
    ], err
    assert re.fullmatch(
        r"  Root cause: rank 1 \(pid \d+\), attempt 1, the first to fail: exit status 1",
        summary[3],
    ), err
    assert summary[4:] == [
        "    ValueError: bad batch 17 (attempt 1)",
        "    at <string>:8 in main",
        f"    error file: {error_file}",
    ], err
    assert json.loads(error_file.read_text())["message"]["message"].startswith("ValueError")
    assert not stale.exists()  # removed before the attempt: never taken for this job's


def test_a_hung_rank_is_the_root_cause_with_its_scope_and_frame(loop: str, marker: str) -> None:
    """The watchdog writes torch's error file into the rank's own file, the launcher reads it."""
    proc = launcher(
        loop,
        marker,
        "-n",
        "2",
        code="""
            import os, time, aiotimer

            def stuck_here():
                time.sleep(60)

            if os.environ["RANK"] == "1":
                with aiotimer.expires(after=0.5, scope="step"):
                    stuck_here()
            time.sleep(60)
        """,
    )
    code, _, err = finish(proc)
    assert code == 124, err
    summary = err[err.index("aiotimer: summary of run") :].splitlines()
    assert summary[1] == (
        "  rank 0: stopped (group stop after rank 1's watchdog fired), killed by SIGTERM"
    ), err
    assert summary[2].startswith("  rank 1: FAILED, its watchdog fired, then killed by SIGKILL")
    pid = re.fullmatch(
        r"  Root cause: rank 1 \(pid (\d+)\), attempt 0, the first to fail: its watchdog fired, "
        r"then killed by SIGKILL",
        summary[3],
    )
    assert pid, err
    assert summary[4] == f"    rank 1 (pid {pid[1]}) hung in 'step' in stuck_here (<string>:5)"
    assert summary[5].startswith(f"    incident: {workdir(marker)}/aiotimer-incidents/incident-")
    assert summary[6].startswith("    error file: ") and len(summary) == 7, err
    error_file = Path(summary[6].split(": ", 1)[1])
    assert error_file.parts[-3:] == ("attempt_0", "1", "error.json"), error_file
    try:
        # Kept: the summary names it.  The watchdog's own, torch's format.
        message = json.loads(error_file.read_text())["message"]["message"]
        assert message.startswith("TimeoutError: aiotimer: watchdog timeout: rank 1"), message
        assert "'step' in stuck_here" in message
    finally:
        shutil.rmtree(error_file.parents[2], ignore_errors=True)


def test_job_names_a_bad_run_id() -> None:
    from aiotimer.launcher import Job

    for bad in ("", "two\nlines", 7):
        with pytest.raises(ValueError, match=r"`run_id` must be a non-empty printable string"):
            Job(["true"], run_id=bad)  # type: ignore[arg-type]


def test_read_error_file_is_bounded_and_never_follows_or_blocks(tmp_path: Path) -> None:
    from aiotimer.launcher import TorchError, read_error_file

    good = tmp_path / "error.json"
    stack = 'Traceback (most recent call last):\n  File "/w/train.py", line 9, in step\n    x\n'
    good.write_text(
        json.dumps({"message": {"message": "KeyError: 'x'", "extraInfo": {"py_callstack": stack}}})
    )
    assert read_error_file(good) == TorchError("KeyError: 'x'", "/w/train.py:9 in step", str(good))
    new = tmp_path / "new.json"  # torch's newer format: the message is a string
    new.write_text(json.dumps({"message": "RuntimeError: boom"}))
    assert read_error_file(new) == TorchError("RuntimeError: boom", None, str(new))
    assert read_error_file(tmp_path / "missing.json") is None
    (tmp_path / "empty.json").write_text("")
    assert read_error_file(tmp_path / "empty.json") is None
    big = tmp_path / "big.json"
    big.write_text(json.dumps({"message": "x" * 5000}))
    too_big = read_error_file(big, limit=1000)
    assert too_big is not None and too_big.message == "(larger than 1000 bytes: not read)"
    link = tmp_path / "link.json"
    link.symlink_to(good)
    followed = read_error_file(link)
    assert followed is not None and followed.message.startswith("(cannot read it:"), followed
    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)  # nobody writes: a blocking open would wait for ever
    assert read_error_file(fifo) == TorchError("(not a regular file)", None, str(fifo))
    (tmp_path / "junk.json").write_text("{not json")
    junk = read_error_file(tmp_path / "junk.json")
    assert junk is not None and junk.message.startswith("(not torch's error file format")
    with pytest.raises(ValueError, match="`limit` must be a positive number of bytes, got 0"):
        read_error_file(good, limit=0)


def test_an_observed_expiry_fails_nothing_and_stops_no_rank(loop: str, marker: str) -> None:
    """--observe: a rank that overran its deadline and then finished stopped the whole group
    (the others were SIGTERMed and listed as FAILED, exit 1); now only failures stop it."""
    proc = launcher(
        loop,
        marker,
        "-n",
        "2",
        "--observe",
        "--dump-timeout",
        "0",
        code="""
            import os, time, aiotimer
            if os.environ["RANK"] == "1":
                with aiotimer.expires(after=0.3, scope="slow"):
                    time.sleep(1)
            else:
                while not os.path.exists("rank1-done"):
                    time.sleep(0.01)
                time.sleep(0.5)  # still running after rank 1's exit was seen
            if os.environ["RANK"] == "1":
                open("rank1-done", "w").close()
            print("done", flush=True)
        """,
    )
    code, out, err = finish(proc)
    assert code == 0, err
    assert out.count("done") == 2, out + err
    assert "rank 0: ok\n" in err and "rank 1: ok; expiries observed: attempt 0 in slow" in err
    assert "Root cause" not in err and "FAILED" not in err and "stopped" not in err
