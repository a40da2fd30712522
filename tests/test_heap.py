"""DeadlineHeap: ordering, replace, release, grouping, pruning, memory."""

import math
import random
import tracemalloc

from aiotimer import DeadlineHeap, Timer


def test_empty_heap_has_no_deadline() -> None:
    heap = DeadlineHeap()
    assert heap.next_deadline() == math.inf
    assert heap.pop_expired(1e9) == []
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
    groups = heap.pop_expired(5.0)
    assert [owner for owner, _ in groups] == [1, 2]
    assert [t.scope for t in groups[0][1]] == ["a"]
    assert [t.scope for t in groups[1][1]] == ["c", "b"]
    assert all(isinstance(t, Timer) for _, ts in groups for t in ts)
    assert heap.next_deadline() == 6.0
    assert len(heap) == 2


def test_deadline_equal_to_now_is_expired_and_later_is_not() -> None:
    heap = DeadlineHeap()
    heap.set(1, "a", 10.0)
    assert heap.pop_expired(math.nextafter(10.0, 0)) == []
    assert [t.scope for _, ts in heap.pop_expired(10.0) for t in ts] == ["a"]


def test_set_same_scope_replaces_the_deadline() -> None:
    heap = DeadlineHeap()
    heap.set(1, "a", 1.0)
    heap.set(1, "a", 7.0)
    assert len(heap) == 1
    assert heap.garbage == 1
    assert heap.next_deadline() == 7.0
    assert heap.pop_expired(5.0) == []
    ((owner, (timer,)),) = heap.pop_expired(7.0)
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


def test_remove_owner_clears_all_its_timers() -> None:
    heap = DeadlineHeap()
    for i in range(5):
        heap.set(1, f"s{i}", float(i))
    heap.set(2, "keep", 3.0)
    removed = heap.remove_owner(1)
    assert sorted(t.scope for t in removed) == [f"s{i}" for i in range(5)]
    assert heap.owners() == [2]
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
            got = {(o, t.scope): t.deadline for o, ts in heap.pop_expired(now) for t in ts}
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
