"""The fair queue: round-robin by user, FIFO within a user, priority, model affinity, bounds."""
from __future__ import annotations

import pytest

from multigen.service.errors import QueueFull
from multigen.service.scheduling import FairQueue, QueuedJob


def drain(q: FairQueue, held=()) -> list[str]:
    out = []
    while (job := q.pop(held)) is not None:
        out.append(job.job_id)
    return out


def test_round_robin_by_user_fifo_within_user():
    q = FairQueue()
    for jid, user in [("a1", "alice"), ("a2", "alice"), ("a3", "alice"), ("b1", "bob"), ("c1", "carol"),
                      ("b2", "bob")]:
        q.push(QueuedJob(jid, user, "m"))
    assert q.order() == ["a1", "b1", "c1", "a2", "b2", "a3"]
    assert drain(q) == ["a1", "b1", "c1", "a2", "b2", "a3"]


def test_user_who_just_ran_waits_for_the_others():
    q = FairQueue()
    q.push(QueuedJob("a1", "alice", "m"))
    assert q.pop().job_id == "a1"
    q.push(QueuedJob("a2", "alice", "m"))
    q.push(QueuedJob("b1", "bob", "m"))
    # alice's queue emptied when she ran; she queued again first, but bob has not had a turn yet
    assert q.order() == ["b1", "a2"]
    assert drain(q) == ["b1", "a2"]


def test_priority_orders_a_users_own_jobs_only():
    q = FairQueue()
    q.push(QueuedJob("a1", "alice", "m"))
    q.push(QueuedJob("a2", "alice", "m", priority=5))
    q.push(QueuedJob("b1", "bob", "m"))
    q.push(QueuedJob("c1", "carol", "m", priority=5))
    # turns by user in arrival order; alice's priority-5 job goes before her own earlier one
    assert drain(q) == ["a2", "b1", "c1", "a1"]


def test_fifty_jobs_at_priority_100_do_not_hold_back_another_user():
    q = FairQueue()
    for i in range(50):
        q.push(QueuedJob(f"a{i}", "alice", "m", priority=100))
    q.push(QueuedJob("b0", "bob", "m", priority=0))
    assert q.position("b0") == 1
    assert drain(q)[:2] == ["a0", "b0"]


def test_a_user_served_long_ago_goes_before_one_served_just_now():
    q = FairQueue()
    for jid, user in [("a1", "alice"), ("b1", "bob"), ("b2", "bob")]:
        q.push(QueuedJob(jid, user, "m"))
    assert [q.pop().job_id for _ in range(2)] == ["a1", "b1"]
    q.push(QueuedJob("a2", "alice", "m"))  # alice was served before bob's last turn
    assert drain(q) == ["a2", "b2"]


def test_positions_follow_the_order_and_update():
    q = FairQueue()
    for jid, user in [("a1", "alice"), ("a2", "alice"), ("b1", "bob")]:
        q.push(QueuedJob(jid, user, "m"))
    assert [q.position(j) for j in ("a1", "b1", "a2")] == [0, 1, 2]
    q.remove("a1")
    assert q.position("a1") is None
    assert [q.position(j) for j in ("a2", "b1")] == [0, 1]


def test_model_affinity_prefers_held_model_but_never_starves():
    q = FairQueue(max_affinity_skips=2)
    for i in range(4):
        q.push(QueuedJob(f"a{i}", "alice", "m1"))
        q.push(QueuedJob(f"b{i}", "bob", "m2"))
    # a worker holding m2 takes bob's jobs ahead of alice's, but alice is passed over at most twice
    got = [q.pop({"m2"}).job_id for _ in range(4)]
    assert got == ["b0", "b1", "a0", "b2"]


def test_affinity_with_no_held_model_is_plain_round_robin():
    q = FairQueue()
    q.push(QueuedJob("a1", "alice", "m1"))
    q.push(QueuedJob("b1", "bob", "m2"))
    assert q.pop({"m3"}).job_id == "a1"


def test_affinity_does_not_jump_priority_within_a_user():
    q = FairQueue()
    q.push(QueuedJob("a1", "alice", "m1", priority=1))
    q.push(QueuedJob("a2", "alice", "m2"))
    assert q.pop({"m2"}).job_id == "a1"


def test_bounds_raise_queue_full_never_block():
    q = FairQueue(max_jobs=3, max_jobs_per_user=2)
    q.push(QueuedJob("a1", "alice", "m"))
    q.push(QueuedJob("a2", "alice", "m"))
    with pytest.raises(QueueFull, match="max_queued_jobs_per_user = 2"):
        q.push(QueuedJob("a3", "alice", "m"))
    q.push(QueuedJob("b1", "bob", "m"))
    with pytest.raises(QueueFull, match="queue full.*max_queued_jobs = 3"):
        q.push(QueuedJob("c1", "carol", "m"))
    assert len(q) == 3
    q.push(QueuedJob("c1", "carol", "m"), force=True)  # restored after a restart: never refused
    assert len(q) == 4


def test_restored_sequence_numbers_keep_arrival_order():
    q = FairQueue()
    q.push(QueuedJob("old2", "alice", "m", seq=7))
    q.push(QueuedJob("old1", "alice", "m", seq=3))
    q.push(QueuedJob("new", "alice", "m"))
    assert drain(q) == ["old1", "old2", "new"]


def test_remove_and_duplicates():
    q = FairQueue()
    q.push(QueuedJob("a1", "alice", "m"))
    with pytest.raises(ValueError):
        q.push(QueuedJob("a1", "alice", "m"))
    assert q.remove("a1").job_id == "a1"
    assert q.remove("a1") is None
    assert q.pop() is None and len(q) == 0
