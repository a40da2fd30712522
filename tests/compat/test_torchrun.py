"""An unmodified torchrun job under `aiotimer serve`: hang, kill, restart, exit 0, nothing left."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")

pytestmark = [pytest.mark.slow, pytest.mark.torch]

ROOT = Path(__file__).resolve().parents[2]
WORKER = ROOT / "examples" / "torchrun_worker.py"


def processes_running(marker: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if marker.encode() in cmdline and state != "Z":
            found.append(int(entry.name))
    return found


def test_torchrun_job_with_a_hung_rank_is_restarted_and_succeeds(tmp_path: Path) -> None:
    torchrun = shutil.which("torchrun") or ""
    if not torchrun:
        pytest.skip("torchrun is not on PATH")
    fifo = tmp_path / "job.fifo"
    worker = tmp_path / "torchrun_worker.py"  # a private copy: its path marks our processes
    shutil.copy(WORKER, worker)
    env = dict(os.environ)
    env.pop("TORCHELASTIC_TIMER_FILE", None)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "aiotimer",
            "serve",
            "--fifo",
            str(fifo),
            "--",
            torchrun,
            "--standalone",
            "--nproc-per-node=2",
            "--max-restarts=1",
            str(worker),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    assert "rank 1: hanging in step 1" in out
    assert "sent SIGKILL to rank 1 (pid" in out  # serve names the rank (torchrun sets RANK)
    assert "rank 0: done on attempt 1" in out and "rank 1: done on attempt 1" in out
    assert not fifo.exists(), "the FIFO was left behind"
    assert processes_running(str(worker)) == [], "a rank was orphaned"
