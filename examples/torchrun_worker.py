"""An unmodified torchrun worker using torch's own FileTimerClient.

Run it under aiotimer, which serves the FIFO that torchrun hands to its workers:

    aiotimer serve --fifo /tmp/job.fifo -- \\
        torchrun --standalone --nproc-per-node=2 --max-restarts=1 examples/torchrun_worker.py

On the first attempt rank 1 hangs inside ``expires(after=1)``; aiotimer kills it at
the deadline, torchrun restarts the group, and the second attempt finishes.
"""

import os
import time

import torch.distributed.elastic.timer as timer

rank = int(os.environ["RANK"])
attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
timer.configure(timer.FileTimerClient(os.environ["TORCHELASTIC_TIMER_FILE"]))

for step in range(3):
    with timer.expires(after=1, scope="step"):
        if rank == 1 and attempt == 0 and step == 1:
            print(f"rank {rank}: hanging in step {step}", flush=True)
            time.sleep(3600)
        time.sleep(0.05)
print(f"rank {rank}: done on attempt {attempt}", flush=True)
