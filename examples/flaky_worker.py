"""A job whose rank 1 hangs once inside a watched step, to show aiotimer at work.

Run it under the watchdog:

    aiotimer run -n 4 --max-restarts 1 -- python examples/flaky_worker.py

Every rank runs a few steps, each inside ``aiotimer.expires(after=1, scope="step")``,
then waits for the other ranks (as a job's last collective would).  On the first
attempt rank 1 hangs in step 2: at its deadline the watchdog captures every rank's
stacks, kills rank 1 and writes the incident; ``aiotimer run`` then stops the other
ranks and restarts the group, and the second attempt finishes.
"""

import os
import time

import aiotimer

rank = int(os.environ.get("RANK", "0"))
attempt = int(os.environ.get("AIOTIMER_RESTART_COUNT", "0"))
steps = 4


def wait_for_the_other_ranks() -> None:
    time.sleep(2.0)


for step in range(steps):
    with aiotimer.expires(after=1.0, scope="step"):
        if step == 2 and rank == 1 and attempt == 0:
            print(f"step {step}: hanging (attempt {attempt})", flush=True)
            time.sleep(3600)
        time.sleep(0.05)
    print(f"step {step} done (attempt {attempt})", flush=True)
wait_for_the_other_ranks()
print("finished", flush=True)
