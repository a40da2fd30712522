"""A worker whose odd ranks hang once inside a watched step, to show aiotimer at work.

Run it under the watchdog:

    aiotimer run -n 4 --max-restarts 1 -- python examples/flaky_worker.py

Every rank runs a few steps, each inside ``aiotimer.expires(after=1, scope="step")``.
On the first attempt, odd ranks hang in step 2 (as a stuck collective would): the
watchdog kills them at the deadline and ``aiotimer run`` restarts them; the
second attempt finishes.
"""

import os
import time

import aiotimer

rank = int(os.environ.get("RANK", "0"))
attempt = int(os.environ.get("AIOTIMER_RESTART_COUNT", "0"))
steps = 4

for step in range(steps):
    with aiotimer.expires(after=1.0, scope="step"):
        if step == 2 and rank % 2 == 1 and attempt == 0:
            print(f"step {step}: hanging (attempt {attempt})", flush=True)
            time.sleep(3600)
        time.sleep(0.05)
    print(f"step {step} done (attempt {attempt})", flush=True)
print("finished", flush=True)
