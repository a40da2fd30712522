"""Deadline heap: pure bookkeeping of timers, with no I/O and no event loop.

Timers are keyed by ``(owner, scope)``.  The heap holds ``Timer`` tuples and
deletes lazily: an entry is live only while the index still maps its key to that
very tuple, so replacing or releasing a timer is O(1) bookkeeping plus, for a
replace, one O(log n) push.  Stale entries are pruned in one O(n) pass once they
outnumber the live ones, which bounds the garbage at about the live count and
keeps every operation amortised O(log n) (the scheme of trio's ``Deadlines``).
"""

from __future__ import annotations

import heapq
import math
from typing import NamedTuple

__all__ = ["DeadlineHeap", "Timer"]

# Below this much garbage, pruning costs more than the memory it frees.
_PRUNE_FLOOR = 256


class Timer(NamedTuple):
    """One armed timer: the process that owns it, its scope, and its deadline."""

    deadline: float
    owner: int
    scope: str


_new_timer = tuple.__new__  # skips NamedTuple's keyword handling on the hot path


class DeadlineHeap:
    """Min-heap of deadlines with O(1) lazy release and bounded garbage.

    ``owner`` is an int naming the process a timer belongs to; ``scope`` names the
    timer within it.  Setting an existing ``(owner, scope)`` replaces its deadline.
    """

    __slots__ = ("_garbage", "_heap", "_live", "_owners")

    def __init__(self) -> None:
        self._heap: list[Timer] = []
        self._owners: dict[int, dict[str, Timer]] = {}
        self._live = 0
        self._garbage = 0

    def __len__(self) -> int:
        return self._live

    def __repr__(self) -> str:
        return (
            f"<DeadlineHeap live={self._live} garbage={self._garbage} "
            f"owners={len(self._owners)} next={self.next_deadline()}>"
        )

    @property
    def garbage(self) -> int:
        """Stale entries still in the heap (released or replaced timers)."""
        return self._garbage

    def set(self, owner: int, scope: str, deadline: float) -> Timer:
        """Arm ``(owner, scope)`` to expire at ``deadline``, replacing any earlier arming."""
        timers = self._owners.get(owner)
        if timers is None:
            timers = self._owners[owner] = {}
        timer: Timer = _new_timer(Timer, (deadline, owner, scope))
        if timers.get(scope) is None:
            self._live += 1
        else:
            self._garbage += 1
        timers[scope] = timer
        heapq.heappush(self._heap, timer)
        if self._garbage > self._live + _PRUNE_FLOOR:
            self.prune()
        return timer

    def get(self, owner: int, scope: str) -> Timer | None:
        """The live timer of ``(owner, scope)``, if any."""
        timers = self._owners.get(owner)
        return None if timers is None else timers.get(scope)

    def remove(self, owner: int, scope: str) -> bool:
        """Release ``(owner, scope)``; return whether it was armed."""
        timers = self._owners.get(owner)
        if timers is None or timers.pop(scope, None) is None:
            return False
        if not timers:
            del self._owners[owner]
        self._live -= 1
        self._garbage += 1
        if self._garbage > self._live + _PRUNE_FLOOR:
            self.prune()
        return True

    def remove_owner(self, owner: int) -> list[Timer]:
        """Release every timer of ``owner`` and return them."""
        timers = self._owners.pop(owner, None)
        if not timers:
            return []
        self._live -= len(timers)
        self._garbage += len(timers)
        if self._garbage > self._live + _PRUNE_FLOOR:
            self.prune()
        return list(timers.values())

    def timers_of(self, owner: int) -> list[Timer]:
        """The live timers of ``owner``, in no particular order."""
        return list(self._owners.get(owner, {}).values())

    def owners(self) -> list[int]:
        """Every owner with at least one live timer."""
        return list(self._owners)

    def _is_live(self, timer: Timer) -> bool:
        timers = self._owners.get(timer[1])
        return timers is not None and timers.get(timer[2]) is timer

    def next_deadline(self) -> float:
        """The earliest live deadline, or ``math.inf`` when no timer is armed."""
        heap = self._heap
        while heap:
            top = heap[0]
            if self._is_live(top):
                return top[0]
            heapq.heappop(heap)
            self._garbage -= 1
        return math.inf

    def due(self, until: float) -> list[Timer]:
        """The live timers with ``deadline <= until``, left in place, in no particular order."""
        heap = self._heap
        found: list[Timer] = []
        stack = [0] if heap else []
        while stack:
            i = stack.pop()
            timer = heap[i]
            if timer[0] > until:  # so is every entry below it
                continue
            if self._is_live(timer):
                found.append(timer)
            child = 2 * i + 1
            if child < len(heap):
                stack.append(child)
                if child + 1 < len(heap):
                    stack.append(child + 1)
        return found

    def pop_expired(self, now: float) -> list[tuple[int, list[Timer]]]:
        """Remove and return every timer with ``deadline <= now``.

        Grouped by owner; groups are ordered by their earliest deadline, and the
        timers within a group earliest first.
        """
        heap = self._heap
        groups: dict[int, list[Timer]] = {}
        while heap and heap[0][0] <= now:
            timer = heapq.heappop(heap)
            owner = timer[1]
            timers = self._owners.get(owner)
            if timers is None or timers.get(timer[2]) is not timer:
                self._garbage -= 1
                continue
            del timers[timer[2]]
            if not timers:
                del self._owners[owner]
            self._live -= 1
            group = groups.get(owner)
            if group is None:
                groups[owner] = [timer]
            else:
                group.append(timer)
        return list(groups.items())

    def prune(self) -> None:
        """Drop every stale entry and re-heapify: O(n), run when garbage outgrows live."""
        self._heap = [t for ts in self._owners.values() for t in ts.values()]
        heapq.heapify(self._heap)
        self._garbage = 0
