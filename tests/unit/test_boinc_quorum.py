"""Replication and quorum bookkeeping."""

from __future__ import annotations

from bonjourgrid_boinc.quorum import Outcome, TaskReplicas, may_take_a_replica, nodes_short, parse_options

GOOD, BAD = Outcome(0, (("o", "aa", 1),)), Outcome(0, (("o", "bb", 1),))


def test_disagreement_asks_for_one_more_replica_on_a_new_node():
    t = TaskReplicas(0, replication=2, quorum=2)
    assert t.wanted() == 2
    a, b = t.issue("A"), t.issue("B")
    assert t.wanted() == 0 and not t.eligible("A")
    t.report(a.name, GOOD)
    t.report(b.name, BAD)
    assert t.canonical() is None and t.wanted() == 1
    assert not t.eligible("A") and not t.eligible("B") and t.eligible("C")
    c = t.issue("C")
    t.report(c.name, GOOD)
    assert t.canonical() is a and [r.node for r in t.rejected()] == ["B"] and t.wanted() == 0


def test_lost_replicas_are_replaced_and_may_go_back_to_the_same_node():
    t = TaskReplicas(1)
    r = t.issue("A")
    assert t.lose_node("A") == [r] and t.wanted() == 1 and t.eligible("A")
    assert t.report(r.name, GOOD) is None  # a late report of a lost replica does not count


def test_options():
    assert parse_options({}) == (1, 1)
    assert parse_options({"replication": 2, "quorum": 2}) == (2, 2)
    assert parse_options({"quorum": 3}) == (3, 3)


def test_a_disagreement_keeps_the_one_worker_that_can_settle_it_and_asks_for_more_when_none_can():
    t = TaskReplicas(0, replication=2, quorum=2)
    settled = TaskReplicas(1, replication=2, quorum=2)
    a, b = t.issue("A"), t.issue("B")
    t.report(a.name, GOOD)
    t.report(b.name, BAD)
    for r in (settled.issue("A"), settled.issue("B")):
        settled.report(r.name, GOOD)
    tasks = [t, settled]
    # the core's queue is dry, yet C must stay: it is the only worker that has not run task 0
    assert may_take_a_replica(tasks, "C") and not may_take_a_replica(tasks, "A")
    assert nodes_short(tasks, ["A", "B", "C"]) == 0
    # without C, the CE must recruit a node to break the tie
    assert nodes_short(tasks, ["A", "B"]) == 1 and nodes_short(tasks, []) == 1
    t.report(t.issue("C").name, GOOD)
    assert not may_take_a_replica(tasks, "C") and nodes_short(tasks, ["A", "B"]) == 0
