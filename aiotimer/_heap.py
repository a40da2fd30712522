"""Deadline heap: pure bookkeeping of timers, with no I/O and no event loop.

A timer is keyed by its owner (an int naming a process), the channel it arrived
on (an int; 0 for callers that have one source) and its scope, so a request on
one channel can never release or re-arm a timer armed on another.  Each entry
also carries the signal its client asked to be killed with (``signal``: 0 for
"the reaper's choice", < 0 for "never signal, only report").

Two levels: each owner keeps a heap of its own timers, and a global heap holds
one entry per owner, keyed by (at most) its earliest deadline.  So one owner's
timers never sit in front of another's deadline: dropping a killed process's
10,000 timers is O(1) for everyone else (``drop_owner``), and popping a due
timer costs O(log of that owner's timers + log of the owners).  Both levels
delete lazily: a timer is live only while its owner's index still maps its key
to that very tuple, and a global entry only while its owner still points at it
(the scheme of trio's ``Deadlines``); each level is pruned in one pass once its
stale entries outnumber its live ones, so a prune walks one owner's timers
(bounded by its cap), not everyone's.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterator
from typing import NamedTuple, TypeVar

__all__ = ["TIMER_BYTES", "DeadlineHeap", "OwnerTimers", "Timer"]

#: What one live timer is counted to cost, in bytes, besides its scope's characters
#: (measured: about 200 bytes per timer, index and heap entry included).
TIMER_BYTES = 200

# Below this much garbage (per owner, and in the global heap), pruning costs
# more than the memory it frees.
_PRUNE_FLOOR = 256
_OWNER_PRUNE_FLOOR = 64


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
_heappush = heapq.heappush
_heappop = heapq.heappop
_heapreplace = heapq.heapreplace
_INF = math.inf

# One global entry: (the owner's earliest deadline, at most; the owner).
_Entry = tuple[float, int]
_Keyed = TypeVar("_Keyed", Timer, _Entry)


def _up_to(heap: list[_Keyed], until: float) -> Iterator[_Keyed]:
    """The entries of a heap array keyed ``<= until``, in no order, others never visited.

    A walk down from the root that stops at an entry keyed above ``until``: so is
    every entry below it.  The heap is only read.
    """
    stack = [0] if heap else []
    size = len(heap)
    while stack:
        i = stack.pop()
        item = heap[i]
        if item[0] > until:
            continue
        yield item
        child = 2 * i + 1
        if child < size:
            stack.append(child)
            if child + 1 < size:
                stack.append(child + 1)


class OwnerTimers:
    """One owner's timers: its own heap, its index, its usage, its global entry."""

    __slots__ = ("chars", "count", "entry", "garbage", "group", "heap", "index", "owner")

    def __init__(self, owner: int, group: list[int]) -> None:
        self.owner = owner
        #: the bytes its group (worker tree) holds, shared with the group's other owners
        self.group = group
        #: this owner's timers, earliest first, released ones deleted lazily
        self.heap: list[Timer] = []
        #: channel -> scope -> live timer.  Nested: most owners use one channel.
        self.index: dict[int, dict[str, Timer]] = {}
        #: live timers, the characters of their scopes, stale heap entries
        self.count = 0
        self.chars = 0
        self.garbage = 0
        #: its entry in the global heap (``None``: not there)
        self.entry: _Entry | None = None

    def __repr__(self) -> str:
        return f"<OwnerTimers {self.owner} live={self.count} garbage={self.garbage}>"

    def top(self) -> Timer | None:
        """The earliest live timer (stale entries above it are dropped), or ``None``."""
        heap = self.heap
        index = self.index
        while heap:
            timer = heap[0]
            timers = index.get(timer[3])
            if timers is not None and timers.get(timer[2]) is timer:
                return timer
            _heappop(heap)
            self.garbage -= 1
        return None

    def due(self, until: float, limit: int | None = None) -> list[Timer]:
        """Live timers with ``deadline <= until`` (at most ``limit``), left in place, unordered."""
        index = self.index
        found: list[Timer] = []
        for timer in _up_to(self.heap, until):
            timers = index.get(timer[3])
            if timers is not None and timers.get(timer[2]) is timer:
                found.append(timer)
                if limit is not None and len(found) >= limit:
                    break
        return found

    def timers(self) -> list[Timer]:
        """Every live timer, in no particular order."""
        return [t for timers in self.index.values() for t in timers.values()]

    def prune(self) -> int:
        """Drop this owner's stale entries; how many were dropped."""
        dropped = self.garbage
        self.heap = self.timers()
        heapq.heapify(self.heap)
        self.garbage = 0
        return dropped


class DeadlineHeap:
    """Min-heap of deadlines in two levels, with O(1) lazy release and bounded garbage.

    Setting an existing ``(owner, scope, channel)`` replaces its deadline and signal.
    """

    __slots__ = ("_garbage", "_groups", "_heap", "_live", "_owners", "_stale")

    def __init__(self) -> None:
        # group -> [bytes its owners' timers hold, owners]: budgets per worker tree
        self._groups: dict[int, list[int]] = {}
        #: the global heap: one entry per owner with live timers (and stale ones)
        self._heap: list[_Entry] = []
        self._owners: dict[int, OwnerTimers] = {}
        self._live = 0
        self._garbage = 0  # stale entries in the owners' heaps
        self._stale = 0  # stale entries in the global heap

    def __len__(self) -> int:
        return self._live

    def __repr__(self) -> str:
        return (
            f"<DeadlineHeap live={self._live} garbage={self.garbage} "
            f"owners={len(self._owners)} next={self.next_deadline()}>"
        )

    @property
    def garbage(self) -> int:
        """Stale entries still held (released or replaced timers, superseded owner entries)."""
        return self._garbage + self._stale

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
        group: int | None = None,
        max_group_bytes: int | None = None,
    ) -> Timer | None:
        """``set``, unless a new timer would take ``owner`` over a cap; then ``None``.

        ``max_timers`` caps the owner's live timers, ``max_scope_chars`` the
        characters of their scopes; ``max_group_bytes`` the bytes
        (``TIMER_BYTES`` + the scope's length per timer) of every owner in
        ``group`` (a worker tree; the owner's own id if ``None``), taken when the
        owner's first timer is set.  Re-arming a timer the owner has is never refused.
        """
        state = self._owners.get(owner)
        cost = TIMER_BYTES + len(scope)
        if state is None:
            if max_timers is not None and max_timers < 1:
                return None
            if max_scope_chars is not None and len(scope) > max_scope_chars:
                return None
            key = owner if group is None else group
            held = self._groups.get(key)
            if max_group_bytes is not None and (held[0] if held else 0) + cost > max_group_bytes:
                return None
            if held is None:
                held = self._groups[key] = [0, 0, key]
            held[1] += 1
            state = self._owners[owner] = OwnerTimers(owner, held)
        index = state.index
        timers = index.get(channel)
        if timers is None:
            timers = index[channel] = {}
        if timers.get(scope) is None:
            if (
                (max_timers is not None and state.count >= max_timers)
                or (max_scope_chars is not None and state.chars + len(scope) > max_scope_chars)
                or (max_group_bytes is not None and state.group[0] + cost > max_group_bytes)
            ):
                if not timers:
                    del index[channel]
                    if state.count == 0:
                        self._forget(state)
                return None
            state.count += 1
            state.chars += len(scope)
            state.group[0] += cost
            self._live += 1
        else:
            state.garbage += 1
            self._garbage += 1
        timer: Timer = _new_timer(Timer, (deadline, owner, scope, channel, signal))
        timers[scope] = timer
        _heappush(state.heap, timer)
        entry = state.entry
        if entry is None or deadline < entry[0]:
            # The owner's earliest deadline moved up: a new global entry.
            if entry is not None:
                self._stale += 1
            entry = state.entry = (deadline, owner)
            _heappush(self._heap, entry)
            if self._stale > len(self._owners) + _PRUNE_FLOOR:
                self._prune_global()
        if state.garbage > state.count + _OWNER_PRUNE_FLOOR:
            self._garbage -= state.prune()
        return timer

    def get(self, owner: int, scope: str, *, channel: int = 0) -> Timer | None:
        """The live timer of ``(owner, scope, channel)``, if any."""
        state = self._owners.get(owner)
        if state is None:
            return None
        timers = state.index.get(channel)
        return None if timers is None else timers.get(scope)

    def _forget(self, state: OwnerTimers) -> None:
        """``state`` has no live timer left (or is dropped): forget it and its group share."""
        del self._owners[state.owner]
        self._garbage -= state.garbage
        group = state.group
        group[0] -= state.count * TIMER_BYTES + state.chars
        group[1] -= 1
        if group[1] <= 0:
            self._groups.pop(group[2], None)
        if state.entry is not None:
            self._stale += 1
            state.entry = None
            if self._stale > len(self._owners) + _PRUNE_FLOOR:
                self._prune_global()

    def remove(self, owner: int, scope: str, *, channel: int = 0) -> bool:
        """Release ``(owner, scope, channel)``; return whether it was armed."""
        state = self._owners.get(owner)
        if state is None:
            return False
        timers = state.index.get(channel)
        if timers is None or timers.pop(scope, None) is None:
            return False
        if not timers:
            del state.index[channel]
        self._live -= 1
        state.count -= 1
        state.chars -= len(scope)
        state.group[0] -= TIMER_BYTES + len(scope)
        if state.count == 0:
            self._forget(state)
            return True
        state.garbage += 1
        self._garbage += 1
        if state.garbage > state.count + _OWNER_PRUNE_FLOOR:
            self._garbage -= state.prune()
        return True

    def drop_owner(self, owner: int) -> OwnerTimers | None:
        """Release every timer of ``owner`` in O(1); return what it held (``None``: nothing).

        For a killed or exited process: the others' deadlines never wait for
        its timers to be popped or counted.  Keep the result until later if its
        timers are many: freeing them takes time too.
        """
        state = self._owners.get(owner)
        if state is None:
            return None
        self._live -= state.count
        self._forget(state)
        return state

    def detach(self, owner: int) -> None:
        """Take ``owner`` out of the global heap (its timers stay): pops pass it by.

        For the killer's burst: a process about to be killed need not have its
        other due timers popped first.  ``attach`` (or ``set``) puts it back.
        """
        state = self._owners.get(owner)
        if state is not None and state.entry is not None:
            state.entry = None
            self._stale += 1

    def attach(self, owner: int) -> None:
        """Put a detached ``owner`` back into the global heap."""
        state = self._owners.get(owner)
        if state is None or state.entry is not None:
            return
        top = self._top(state)
        if top is not None:
            state.entry = (top[0], owner)
            _heappush(self._heap, state.entry)

    def group_bytes(self, group: int) -> int:
        """Bytes the timers of ``group``'s owners hold (see ``try_set``)."""
        held = self._groups.get(group)
        return 0 if held is None else held[0]

    def usage(self, owner: int) -> tuple[int, int]:
        """``owner``'s live timers and the characters of their scopes."""
        state = self._owners.get(owner)
        return (0, 0) if state is None else (state.count, state.chars)

    def _top(self, state: OwnerTimers) -> Timer | None:
        """``state``'s earliest live timer; the stale entries dropped above it leave the count."""
        before = state.garbage
        top = state.top()
        self._garbage -= before - state.garbage
        return top

    def _settle(self) -> OwnerTimers | None:
        """Make the global top exact (its owner's true earliest deadline); return that owner.

        Stale global entries are dropped; an owner whose earliest timer was
        released is moved down to its next one.
        """
        heap = self._heap
        owners = self._owners
        while heap:
            entry = heap[0]
            state = owners.get(entry[1])
            if state is None or state.entry is not entry:
                _heappop(heap)
                self._stale -= 1
                continue
            top = self._top(state)
            if top is None:  # cannot be: an owner with no live timer is forgotten
                _heappop(heap)
                state.entry = None
                continue
            if top[0] != entry[0]:
                state.entry = (top[0], entry[1])
                _heapreplace(heap, state.entry)
                continue
            return state
        return None

    def next_deadline(self) -> float:
        """The earliest live deadline, or ``math.inf`` when no timer is armed."""
        state = self._settle()
        return _INF if state is None or state.entry is None else state.entry[0]

    def due(self, until: float, *, limit: int | None = None) -> list[Timer]:
        """Live timers with ``deadline <= until`` (at most ``limit``), left in place, unordered.

        Read-only (another thread may call it: the guard).
        """
        owners = self._owners
        found: list[Timer] = []
        for entry in _up_to(self._heap, until):
            state = owners.get(entry[1])
            if state is not None and state.entry is entry:
                left = None if limit is None else limit - len(found)
                found += state.due(until, left)
                if limit is not None and len(found) >= limit:
                    break
        return found

    def pop_due(self, now: float) -> Timer | None:
        """Remove and return the earliest live timer if its deadline is ``<= now``."""
        state = self._settle()
        if state is None or state.entry is None or state.entry[0] > now:
            return None
        timer = _heappop(state.heap)  # live: _settle made it the owner's top
        timers = state.index[timer[3]]
        del timers[timer[2]]
        if not timers:
            del state.index[timer[3]]
        self._live -= 1
        state.count -= 1
        state.chars -= len(timer[2])
        state.group[0] -= TIMER_BYTES + len(timer[2])
        if state.count == 0:
            _heappop(self._heap)
            state.entry = None
            self._forget(state)  # its entry was just popped: nothing left stale
            return timer
        top = self._top(state)
        assert top is not None
        state.entry = (top[0], state.owner)
        _heapreplace(self._heap, state.entry)
        return timer

    def _prune_global(self) -> None:
        self._heap = [s.entry for s in self._owners.values() if s.entry is not None]
        heapq.heapify(self._heap)
        self._stale = 0

    def prune(self) -> None:
        """Drop every stale entry, in every owner and the global heap."""
        for state in self._owners.values():
            self._garbage -= state.prune()
        self._prune_global()
