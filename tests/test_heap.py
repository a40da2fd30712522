"""DeadlineHeap: ordering, replace, release, grouping, pruning, memory."""

import math
import random
import tracemalloc

from helpers import owners, pop_expired

from aiotimer import DeadlineHeap, Timer


def test_empty_heap_has_no_deadline() -> None:
    heap = DeadlineHeap()
    assert heap.next_deadline() == math.inf
    assert pop_expired(heap, 1e9) == []
    assert len(heap) == 0


def test_due_lists_live_timers_up_to_a_time_and_leaves_them_armed() -> None:
    heap = DeadlineHeap()
    for owner in range(50):
        heap.set(owner, "s", float(owner))
    heap.set(7, "s", 100.0)  # replaced: the stale entry at 7.0 is garbage now
    heap.remove(3, "s")  # released
    due = heap.due(10.0)
    assert sorted((t.owner, t.deadline) for t in due) == [
        (o, float(o)) for o in range(11) if o not in (3, 7)
    ]
    assert len(heap) == 49 and heap.next_deadline() == 0.0
    assert heap.due(-1.0) == [] and DeadlineHeap().due(1e9) == []


def test_pop_expired_returns_due_timers_grouped_by_owner_earliest_first() -> None:
    heap = DeadlineHeap()
    heap.set(2, "b", 5.0)
    heap.set(1, "a", 3.0)
    heap.set(2, "c", 4.0)
    heap.set(1, "late", 9.0)
    heap.set(3, "x", 6.0)
    assert heap.next_deadline() == 3.0
    groups = pop_expired(heap, 5.0)
    assert [owner for owner, _ in groups] == [1, 2]
    assert [t.scope for t in groups[0][1]] == ["a"]
    assert [t.scope for t in groups[1][1]] == ["c", "b"]
    assert all(isinstance(t, Timer) for _, ts in groups for t in ts)
    assert heap.next_deadline() == 6.0
    assert len(heap) == 2


def test_deadline_equal_to_now_is_expired_and_later_is_not() -> None:
    heap = DeadlineHeap()
    heap.set(1, "a", 10.0)
    assert pop_expired(heap, math.nextafter(10.0, 0)) == []
    assert [t.scope for _, ts in pop_expired(heap, 10.0) for t in ts] == ["a"]


def test_set_same_scope_replaces_the_deadline() -> None:
    heap = DeadlineHeap()
    heap.set(1, "a", 1.0)
    heap.set(1, "a", 7.0)
    assert len(heap) == 1
    assert heap.garbage == 1
    assert heap.next_deadline() == 7.0
    assert pop_expired(heap, 5.0) == []
    ((owner, (timer,)),) = pop_expired(heap, 7.0)
    assert (owner, timer.scope, timer.deadline) == (1, "a", 7.0)


def test_release_removes_only_that_scope() -> None:
    heap = DeadlineHeap()
    heap.set(1, "a", 1.0)
    heap.set(1, "b", 2.0)
    assert heap.remove(1, "a") is True
    assert heap.remove(1, "a") is False
    assert heap.remove(9, "a") is False
    assert heap.next_deadline() == 2.0
    assert heap.get(1, "b") is not None and heap.get(1, "a") is None


def test_drop_owner_clears_all_its_timers() -> None:
    heap = DeadlineHeap()
    for i in range(5):
        heap.set(1, f"s{i}", float(i))
    heap.set(2, "keep", 3.0)
    removed = heap.drop_owner(1)
    assert removed is not None and removed.count == 5
    assert sorted(t.scope for t in removed.timers()) == [f"s{i}" for i in range(5)]
    assert owners(heap) == [2]
    assert heap.next_deadline() == 3.0


def test_garbage_is_pruned_in_batches_and_stays_bounded() -> None:
    heap = DeadlineHeap()
    for i in range(10):
        heap.set(1, f"live{i}", 1000.0 + i)
    for i in range(100_000):
        heap.set(2, "churn", float(i))
        heap.remove(2, "churn")
        assert heap.garbage <= len(heap) + 256 + 1
    assert len(heap) == 10
    assert len(heap._heap) <= 10 + 257
    assert heap.next_deadline() == 1000.0


def test_matches_a_reference_model_under_random_operations() -> None:
    rng = random.Random(1234)
    heap = DeadlineHeap()
    model: dict[tuple[int, str], float] = {}
    now = 0.0
    for _ in range(20_000):
        r = rng.random()
        key = (rng.randrange(8), f"s{rng.randrange(6)}")
        if r < 0.5:
            deadline = now + rng.uniform(0, 10)
            heap.set(*key, deadline)
            model[key] = deadline
        elif r < 0.8:
            assert heap.remove(*key) == (key in model)
            model.pop(key, None)
        else:
            now += rng.uniform(0, 3)
            got = {(o, t.scope): t.deadline for o, ts in pop_expired(heap, now) for t in ts}
            want = {k: d for k, d in model.items() if d <= now}
            assert got == want
            for k in want:
                del model[k]
        assert len(heap) == len(model)
        assert heap.next_deadline() == min(model.values(), default=math.inf)


def test_memory_per_live_timer_is_about_200_bytes() -> None:
    n = 100_000
    scopes = [f"rank{i}/step" for i in range(100)]  # scopes repeat across workers, as in a job
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        heap = DeadlineHeap()
        for i in range(n):
            heap.set(i // 100, scopes[i % 100], 1000.0 + i * 1e-3)
        after = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    per_timer = (after - before) / n
    assert len(heap) == n
    assert per_timer <= 220, f"{per_timer:.0f} bytes per timer"


def test_a_group_budget_caps_the_bytes_of_all_its_owners_and_is_freed_exactly() -> None:
    from aiotimer._heap import TIMER_BYTES

    heap = DeadlineHeap()
    cap = 10 * (TIMER_BYTES + 2)
    armed = [
        heap.try_set(owner, f"s{i}", 1.0 + i, group=7, max_group_bytes=cap)
        for owner in (1, 2, 3)
        for i in range(5)
    ]
    assert sum(t is not None for t in armed) == 10  # 5 + 5, the third owner refused
    assert heap.group_bytes(7) == cap and owners(heap) == [1, 2]
    assert heap.try_set(9, "other tree", 1.0, group=8, max_group_bytes=cap) is not None
    heap.remove(1, "s0")
    heap.pop_due(2.0)  # owner 1's "s1" (2.0) or owner 2's "s0" (1.0): either way one timer
    assert heap.group_bytes(7) == cap - 2 * (TIMER_BYTES + 2)
    heap.drop_owner(2)
    heap.drop_owner(1)
    assert heap.group_bytes(7) == 0 and heap._groups.keys() == {8}


def test_group_bytes_match_a_reference_model_under_random_operations() -> None:
    from aiotimer._heap import TIMER_BYTES

    rng = random.Random(99)
    heap = DeadlineHeap()
    model: dict[tuple[int, str], float] = {}
    for _ in range(20_000):
        r = rng.random()
        owner = rng.randrange(6)
        key = (owner, f"s{rng.randrange(5)}")
        if r < 0.5:
            heap.try_set(*key, rng.uniform(0, 100), group=owner % 2)
            model[key] = 0.0
        elif r < 0.8:
            heap.remove(*key)
            model.pop(key, None)
        elif r < 0.9:
            for o, ts in pop_expired(heap, rng.uniform(0, 50)):
                for t in ts:
                    model.pop((o, t.scope), None)
        else:
            heap.drop_owner(owner)
            model = {k: v for k, v in model.items() if k[0] != owner}
        for group in (0, 1):
            want = sum(TIMER_BYTES + len(s) for (o, s) in model if o % 2 == group)
            assert heap.group_bytes(group) == want
