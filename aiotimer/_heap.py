"""Deadline heap: pure bookkeeping of timers, with no I/O and no event loop.

A timer is keyed by its owner (an int naming a process), the channel it arrived
on (an int; 0 for callers that have one source) and its scope, so a request on
one channel can never release or re-arm a timer armed on another.  Each entry
also carries the signal its client asked to be killed with (``signal``: 0 for
"the reaper's choice", < 0 for "never signal, only report").

The heap holds ``Timer`` tuples and deletes lazily: an entry is live only while
the index still maps its key to that very tuple, so replacing or releasing a
timer is O(1) bookkeeping plus, for a replace, one O(log n) push.  Stale entries
are pruned in one O(n) pass once they outnumber the live ones, which bounds the
garbage at about the live count and keeps every operation amortised O(log n)
(the scheme of trio's ``Deadlines``).
"""

from __future__ import annotations

import heapq
import math
from typing import NamedTuple

__all__ = ["DeadlineHeap", "Timer"]

# Below this much garbage, pruning costs more than the memory it frees.
_PRUNE_FLOOR = 256


class Timer(NamedTuple):
    """One armed timer: its deadline, owner, scope, channel and requested signal.

    ``signal`` is what the client asked to be killed with: 0 leaves the choice
    to the reaper, a negative value asks for the expiry to be reported only.
    """

    deadline: float
    owner: int
    scope: str
    channel: int = 0
    signal: int = 0


_new_timer = tuple.__new__  # skips NamedTuple's keyword handling on the hot path

# owner -> channel -> scope -> live timer.  Nested rather than keyed by tuples:
# most owners use one channel, so this costs one small dict per owner instead
# of a key tuple per timer.
_Index = dict[int, dict[int, dict[str, Timer]]]


class DeadlineHeap:
    """Min-heap of deadlines with O(1) lazy release and bounded garbage.

    Setting an existing ``(owner, scope, channel)`` replaces its deadline and signal.
    """

    __slots__ = ("_garbage", "_heap", "_live", "_owners", "_usage")

    def __init__(self) -> None:
        self._heap: list[Timer] = []
        self._owners: _Index = {}
        # owner -> [live timers, characters of their scopes], for per-owner caps
        self._usage: dict[int, list[int]] = {}
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

    def set(
        self, owner: int, scope: str, deadline: float, *, channel: int = 0, signal: int = 0
    ) -> Timer:
        """Arm ``(owner, scope, channel)`` to expire at ``deadline``, replacing any earlier one."""
        timer = self.try_set(owner, scope, deadline, channel=channel, signal=signal)
        assert timer is not None  # no caps: always armed
        return timer

    def try_set(
        self,
        owner: int,
        scope: str,
        deadline: float,
        *,
        channel: int = 0,
        signal: int = 0,
        max_timers: int | None = None,
        max_scope_chars: int | None = None,
    ) -> Timer | None:
        """``set``, unless a new timer would take ``owner`` over a cap; then ``None``.

        ``max_timers`` caps the owner's live timers, ``max_scope_chars`` the
        characters of their scopes.  Re-arming a timer the owner has is never refused.
        """
        channels = self._owners.get(owner)
        if channels is None:
            channels = self._owners[owner] = {}
            usage = self._usage[owner] = [0, 0]
        else:
            usage = self._usage[owner]
        timers = channels.get(channel)
        if timers is None:
            timers = channels[channel] = {}
        if timers.get(scope) is None:
            if (max_timers is not None and usage[0] >= max_timers) or (
                max_scope_chars is not None and usage[1] + len(scope) > max_scope_chars
            ):
                if not timers:
                    del channels[channel]
                    if not channels:
                        del self._owners[owner]
                        del self._usage[owner]
                return None
            usage[0] += 1
            usage[1] += len(scope)
            self._live += 1
        else:
            self._garbage += 1
        timer: Timer = _new_timer(Timer, (deadline, owner, scope, channel, signal))
        timers[scope] = timer
        heapq.heappush(self._heap, timer)
        if self._garbage > self._live + _PRUNE_FLOOR:
            self.prune()
        return timer

    def get(self, owner: int, scope: str, *, channel: int = 0) -> Timer | None:
        """The live timer of ``(owner, scope, channel)``, if any."""
        timers = self._owners.get(owner, {}).get(channel)
        return None if timers is None else timers.get(scope)

    def _unindex(self, owner: int, channel: int, scope: str) -> Timer | None:
        channels = self._owners.get(owner)
        if channels is None:
            return None
        timers = channels.get(channel)
        if timers is None:
            return None
        timer = timers.pop(scope, None)
        if timer is None:
            return None
        if not timers:
            del channels[channel]
            if not channels:
                del self._owners[owner]
                del self._usage[owner]
                return timer
        usage = self._usage[owner]
        usage[0] -= 1
        usage[1] -= len(scope)
        return timer

    def remove(self, owner: int, scope: str, *, channel: int = 0) -> bool:
        """Release ``(owner, scope, channel)``; return whether it was armed."""
        if self._unindex(owner, channel, scope) is None:
            return False
        self._live -= 1
        self._garbage += 1
        if self._garbage > self._live + _PRUNE_FLOOR:
            self.prune()
        return True

    def remove_owner(self, owner: int) -> list[Timer]:
        """Release every timer of ``owner`` and return them."""
        channels = self._owners.pop(owner, None)
        if not channels:
            return []
        del self._usage[owner]
        removed = [t for timers in channels.values() for t in timers.values()]
        self._live -= len(removed)
        self._garbage += len(removed)
        if self._garbage > self._live + _PRUNE_FLOOR:
            self.prune()
        return removed

    def usage(self, owner: int) -> tuple[int, int]:
        """``owner``'s live timers and the characters of their scopes."""
        usage = self._usage.get(owner)
        return (0, 0) if usage is None else (usage[0], usage[1])

    def timers_of(self, owner: int) -> list[Timer]:
        """The live timers of ``owner``, in no particular order."""
        return [t for timers in self._owners.get(owner, {}).values() for t in timers.values()]

    def owners(self) -> list[int]:
        """Every owner with at least one live timer."""
        return list(self._owners)

    def _is_live(self, timer: Timer) -> bool:
        timers = self._owners.get(timer[1], {}).get(timer[3])
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

    def due(self, until: float, *, limit: int | None = None) -> list[Timer]:
        """Live timers with ``deadline <= until`` (at most ``limit``), left in place, unordered."""
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
                if limit is not None and len(found) >= limit:
                    break
            child = 2 * i + 1
            if child < len(heap):
                stack.append(child)
                if child + 1 < len(heap):
                    stack.append(child + 1)
        return found

    def pop_due(self, now: float) -> Timer | None:
        """Remove and return the earliest live timer if its deadline is ``<= now``."""
        # On the kill path: the index is walked inline, not through helpers.
        heap = self._heap
        owners = self._owners
        while heap and heap[0][0] <= now:
            timer = heapq.heappop(heap)
            channels = owners.get(timer[1])
            timers = None if channels is None else channels.get(timer[3])
            if timers is None or timers.get(timer[2]) is not timer:
                self._garbage -= 1
                continue
            del timers[timer[2]]
            if not timers:
                del channels[timer[3]]  # type: ignore[union-attr]
                if not channels:
                    del owners[timer[1]]
                    del self._usage[timer[1]]
                    self._live -= 1
                    return timer
            usage = self._usage[timer[1]]
            usage[0] -= 1
            usage[1] -= len(timer[2])
            self._live -= 1
            return timer
        return None

    def pop_expired(self, now: float) -> list[tuple[int, list[Timer]]]:
        """Remove and return every timer with ``deadline <= now``.

        Grouped by owner; groups are ordered by their earliest deadline, and the
        timers within a group earliest first.
        """
        groups: dict[int, list[Timer]] = {}
        while (timer := self.pop_due(now)) is not None:
            group = groups.get(timer[1])
            if group is None:
                groups[timer[1]] = [timer]
            else:
                group.append(timer)
        return list(groups.items())

    def prune(self) -> None:
        """Drop every stale entry and re-heapify: O(n), run when garbage outgrows live."""
        self._heap = [
            t for channels in self._owners.values() for ts in channels.values() for t in ts.values()
        ]
        heapq.heapify(self._heap)
        self._garbage = 0
