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


#: A torchrun worker using aiotimer's own API (no torch timer client): rank 1 hangs in the
#: block named by argv[1] ("expires" or "timer"); the other rank waits for it in a collective.
NATIVE_WORKER = """
import asyncio, os, sys, time
import torch
import torch.distributed as dist
import aiotimer

rank = int(os.environ["RANK"])
mode, loop = sys.argv[1], sys.argv[2]
dist.init_process_group("gloo")
print(f"rank {rank}: client {type(aiotimer.get_client()).__name__}", flush=True)

def step_sync(step):
    with aiotimer.expires(after=2, scope=f"sync step {step}"):
        if rank == 1 and step == 1:
            print(f"rank {rank}: hanging in sync step {step}", flush=True)
            time.sleep(3600)
        dist.all_reduce(torch.ones(4))

async def step_async(step):
    async with aiotimer.timer(after=2, scope=f"async step {step}"):
        if rank == 1 and step == 1:
            print(f"rank {rank}: hanging in async step {step}", flush=True)
            await asyncio.sleep(3600)
        await asyncio.to_thread(dist.all_reduce, torch.ones(4))

async def main():
    for step in range(3):
        await step_async(step)

if mode == "expires":
    for step in range(3):
        step_sync(step)
elif loop == "uvloop":
    import uvloop
    uvloop.run(main())
else:
    asyncio.run(main())
print(f"rank {rank}: done", flush=True)
"""


@pytest.mark.parametrize(
    ("mode", "loop"), [("expires", "-"), ("timer", "asyncio"), ("timer", "uvloop")]
)
def test_torchrun_ranks_using_aiotimers_own_api_under_serve(
    tmp_path: Path, mode: str, loop: str
) -> None:
    """Issue 20: `aiotimer serve -- torchrun ... train.py` with `aiotimer.expires` / `timer` in
    train.py crashed every rank (AIOTIMER_FD is not inherited through torchrun)."""
    torchrun = shutil.which("torchrun") or ""
    if not torchrun:
        pytest.skip("torchrun is not on PATH")
    if loop == "uvloop":
        pytest.importorskip("uvloop")
    worker = tmp_path / "train.py"  # a private copy: its path marks our processes
    worker.write_text(NATIVE_WORKER)
    incidents = tmp_path / "incidents"
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIOTIMER_")}
    env.pop("TORCHELASTIC_TIMER_FILE", None)
    env["TORCHELASTIC_ENABLE_FILE_TIMER"] = "1"  # as torch's docs say to; must not break it
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "aiotimer",
            "serve",
            "--incident-dir",
            str(incidents),
            "--",
            torchrun,
            "--standalone",
            "--nproc-per-node=2",
            "--max-restarts=0",
            str(worker),
            mode,
            loop,
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=tmp_path,
    )
    out = result.stdout + result.stderr
    assert out.count("client SocketClient") == 2, out
    assert f"rank 1: hanging in {'sync' if mode == 'expires' else 'async'} step 1" in out, out
    assert "sent SIGKILL to pid" in out or "SIGKILL" in out, out
    assert result.returncode != 0, out  # torchrun reports the killed rank's failure
    assert "ServerUnavailableError" not in out and "NotEntitledError" not in out, out
    scope = f"{'sync' if mode == 'expires' else 'async'} step 1"
    texts = [p.read_text() for p in incidents.rglob("*") if p.is_file()]
    assert any(scope in text for text in texts), (out, [p.name for p in incidents.rglob("*")])
    assert processes_running(str(worker)) == [], "a rank was orphaned"
