import time

from bonjourgrid.announcement import Announcement, Role
from bonjourgrid.scheduler import Dispatch, Needs, explain_no_match, rank, recruitable, satisfies


def ann(node_id, role=Role.IDLE, caps=(), cpus=4, mem=4096, slots=4, load=0.1, fmem=2000):
    return Announcement(grid="g", node_id=node_id, host=node_id, role=role, cpus=cpus, memory_mib=mem,
                        free_slots=slots, free_memory_mib=fmem, load=load, os="linux", arch="x86_64", caps=caps,
                        ce=None if role is Role.IDLE else "c", timestamp_ms=int(time.time() * 1000))


def test_capability_matching_is_steep_style():
    assert satisfies(["docker", "site=lab1"], ["docker", "site=lab1", "python3.11"])
    assert satisfies(["gpu"], ["gpu=a100"])  # a bare key is met by any value
    assert not satisfies(["gpu=h100"], ["gpu=a100"])
    assert not satisfies(["docker"], [])
    assert satisfies([], [])


def test_recruitable_ranks_matching_idle_nodes_best_first():
    nodes = [ann("a", slots=1), ann("b", slots=8), ann("c", caps=("docker",), slots=2),
             ann("d", role=Role.WORKER, slots=8), ann("e", slots=8, load=0.9), ann("f", cpus=1, slots=1)]
    assert [a.node_id for a in recruitable(nodes, Needs(), set())] == ["b", "e", "c", "a", "f"]
    assert [a.node_id for a in recruitable(nodes, Needs(("docker",)), set())] == ["c"]
    assert [a.node_id for a in recruitable(nodes, Needs(cpus=2), {"b"})] == ["e", "c", "a"]
    assert [a.node_id for a in rank([ann("x", fmem=1), ann("y", fmem=9)])] == ["y", "x"]


def test_no_match_is_explained():
    nodes = [ann("a"), ann("b"), ann("c", caps=("docker",), mem=100)]
    msg = explain_no_match(nodes, Needs(("docker",), memory_bytes=1 << 30))
    assert msg == "no idle node matches the job's requirements (3 idle: 2 lacks docker; 1 lends 100M < 1G)"
    assert "no node of this grid is visible" in explain_no_match([], Needs())
    assert "none of the 1 visible nodes is idle" in explain_no_match([ann("w", role=Role.WORKER)], Needs())


def test_dispatch_pull_requeue_and_retry_elsewhere():
    d = Dispatch(range(5))
    d.add_worker("w1", 2)
    d.add_worker("w2", 2)
    assert d.take("w1", 2) == [0, 1]
    assert d.take("w2", 2) == [2, 3]
    d.requeue(0)  # task 0 failed on w1: it goes to w2 rather than back to w1
    assert d.take("w1", 1) == [4]
    assert d.take("w1", 1) == []
    assert d.workers["w1"].waiting == 1
    d.finish(2)
    assert d.take("w2", 1) == [0]
    assert d.tried[0] == {"w1", "w2"}


def test_a_task_that_failed_on_every_worker_is_retried_by_any_of_them():
    d = Dispatch([0])
    d.add_worker("w1", 1)
    d.add_worker("w2", 1)
    assert d.take("w1", 1) == [0]
    d.requeue(0)
    assert d.take("w1", 1) == []  # w2 has not tried it yet: it waits for w2
    assert d.take("w2", 1) == [0]
    d.requeue(0)
    assert d.take("w1", 0) == [0]  # tried everywhere: the worker still owed a task gets it
    d.add_worker("w3", 1)
    d.requeue(0)
    assert d.take("w2", 1) == [] and d.take("w3", 1) == [0]  # a newcomer is preferred again


def test_tasks_given_back_go_first_and_are_still_owed():
    d = Dispatch(range(4))
    d.add_worker("w1", 2)
    assert d.take("w1", 2) == [0, 1]
    d.give_back("w1", [0, 1])  # the journal refused to mark them running
    assert d.pending == 4 and not d.running and not d.workers["w1"].running
    assert d.workers["w1"].waiting == 2
    assert d.take("w1", 0) == [0, 1]  # the next message from w1, asking nothing new, gets them


def test_unmet_requests_add_up_and_are_granted_later():
    d = Dispatch(range(6))
    d.add_worker("w1", 1)
    assert d.take("w1", 4) == [0, 1, 2, 3]
    assert d.take("w1", 3) == [4, 5]
    assert d.take("w1", 2) == []
    assert d.workers["w1"].waiting == 3  # one from the second ask, two from the third
    d.requeue(0)
    d.requeue(1)
    assert sorted(d.take("w1", 0)) == [0, 1]  # a grant: nothing new asked
    assert d.workers["w1"].waiting == 1


def test_lost_worker_tasks_come_back_first_and_a_lone_worker_gets_its_retries():
    d = Dispatch(range(3))
    d.add_worker("w1", 2)
    assert d.take("w1", 2) == [0, 1]
    assert sorted(d.remove_worker("w1")) == [0, 1]
    d.add_worker("w2", 1)
    assert d.take("w2", 3) in ([0, 1, 2], [1, 0, 2])
    d2 = Dispatch([7])
    d2.add_worker("only", 1)
    d2.take("only", 1)
    d2.requeue(7)
    assert d2.take("only", 1) == [7]  # nobody else to try it on


def test_growth_and_shrink_decisions():
    d = Dispatch(range(10))
    assert d.workers_wanted(None) == 10
    d.add_worker("w1", 4)
    assert d.workers_wanted(None) == 6
    assert d.workers_wanted(2) == 1
    d.take("w1", 4)
    assert d.idle_workers() == []
    for i in range(4):
        d.finish(i)
    d.take("w1", 6)
    for i in range(4, 10):
        d.finish(i)
    assert d.workers_wanted(None) == 0 and d.idle_workers() == ["w1"]


def test_a_replica_that_ran_dry_is_not_released():
    """The coordinator keeps its replicas to the end: they hold the journal."""
    d = Dispatch(range(2))
    for w in ("w1", "w2", "w3"):
        d.add_worker(w, 1)
    d.take("w1", 1)
    d.take("w2", 1)
    d.finish(0)
    assert d.idle_workers(keep=["w1"]) == ["w3"]
    assert sorted(d.idle_workers()) == ["w1", "w3"]


def test_middleware_placed_tasks_are_claimed():
    d = Dispatch(range(4))
    d.add_worker("w1", 2)
    d.claim(2, "w1")
    assert d.running == {2: "w1"} and d.pending == 3 and d.workers["w1"].running == {2}
    d.requeue(2)
    d.claim(2, "w9")  # a node the CE does not know as a worker yet
    assert d.running == {2: "w9"} and 2 not in d.retry


def test_held_replicas_keep_a_worker_busy():
    d = Dispatch([0])
    d.add_worker("w1", 1)
    d.add_worker("w2", 1)
    d.claim(0, "w1")
    d.hold("w2", 0)  # a second (quorum) replica runs on w2
    assert d.idle_workers() == []
    d.unhold("w2", 0)
    assert d.idle_workers() == ["w2"]


def test_a_task_finished_while_still_queued_leaves_the_queue():
    """After a takeover the journal may list a task as pending that a worker already ran: its resent
    result is recorded while the task sits in the queue. It must not be handed out again (a worker
    that asked for n tasks and got fewer, with nothing sent, waited forever and stalled the job)."""
    d = Dispatch(range(6))
    d.add_worker("w1", 1)
    for i in (1, 2, 4):
        d.finish(i)  # resent results of the old coordinator's era
    assert d.pending == 3
    assert d.take("w1", 2) == [0, 3]
    d.requeue(0)
    d.finish(0)  # the requeued attempt's older result came in after all
    assert d.take("w1", 5) == [5] and d.pending == 0
    assert d.workers["w1"].waiting == 4


def test_set_pending_replaces_the_queue():
    d = Dispatch(range(3))
    d.set_pending([7, 8])
    assert d.pending == 2 and list(d.fresh) == [7, 8]
    d.requeue(7)  # a requeued task is queued once
    assert d.pending == 2 and sorted([*d.fresh, *d.retry]) == [7, 8]
