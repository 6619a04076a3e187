import pytest

from bonjourgrid import nodestate as ns
from bonjourgrid.announcement import Role


@pytest.fixture
def m():
    machine = ns.NodeMachine("n1")
    assert machine.start() == [ns.Publish(Role.IDLE)]
    return machine


def recruit(ce="ce1", epoch=1, now=0.0, lease=10.0):
    return ns.Recruit(ce=ce, coordinator="c1", epoch=epoch, lease_s=lease, now=now)


def test_recruit_accept_publishes_worker_first(m):
    actions = m.handle(recruit())
    assert actions == [ns.Publish(Role.WORKER, ce="ce1", coordinator="c1", epoch=1), ns.Accepted("ce1", 1, 10.0)]
    assert m.state.role is Role.WORKER


def test_a_node_is_in_one_ce_at_a_time(m):
    m.handle(recruit("ce1"))
    actions = m.handle(recruit("ce2"))
    assert actions == [ns.Refused("ce2", "busy: worker of CE ce1")]
    assert m.state.ce == "ce1"


def test_same_ce_higher_epoch_renews_lower_epoch_refused(m):
    m.handle(recruit("ce1", epoch=2))
    assert isinstance(m.handle(recruit("ce1", epoch=1))[0], ns.Refused)
    acts = m.handle(recruit("ce1", epoch=3, now=5.0))
    assert ns.Accepted("ce1", 3, 15.0) in acts
    assert m.state.epoch == 3


def test_a_node_back_to_idle_refuses_the_coordinator_its_ce_replaced(m):
    """A coordinator that froze and thawed after its successor finished the job must step down,
    not recruit the idle desktops again for a second run of the job."""
    m.handle(recruit("ce1", epoch=1))
    m.handle(ns.RenewLease("ce1", 2, 10.0, now=1.0, coordinator="c2"))  # followed the successor
    assert m.state.service().coordinator == "c2"
    m.handle(ns.Release("ce1", 2))
    assert m.state.role is Role.IDLE
    [refused] = m.handle(recruit("ce1", epoch=1, now=2.0))
    assert refused.moved_to == (2, "c2") and "moved to epoch 2" in refused.reason
    assert m.state.role is Role.IDLE
    assert ns.Accepted("ce1", 3, 12.0) in m.handle(recruit("ce1", epoch=3, now=2.0))  # a later takeover


def test_the_successor_itself_refuses_the_coordinator_it_replaced(m):
    m.handle(recruit("ce1", epoch=1))
    m.handle(ns.Coordinate("ce1", 2))
    m.handle(ns.EndCoordination("ce1"))
    [refused] = m.handle(recruit("ce1", epoch=1))
    assert refused.moved_to == (2, "")  # this node: the runtime names itself
    assert isinstance(m.handle(recruit("ce2", epoch=1))[-1], ns.Accepted)  # other CEs are unaffected


def test_known_epochs_are_bounded(m):
    for i in range(ns.KNOWN_CES + 10):
        m.handle(recruit(f"ce{i}", epoch=5))
        m.handle(ns.Release(f"ce{i}", 5))
    assert len(m.state.known) == ns.KNOWN_CES
    assert isinstance(m.handle(recruit(f"ce{ns.KNOWN_CES + 9}", epoch=1))[0], ns.Refused)  # the newest kept


def test_release_returns_to_idle(m):
    m.handle(recruit())
    assert m.handle(ns.Release("ce1", 1)) == [ns.Publish(Role.IDLE), ns.LeftCE("ce1", "released by the coordinator")]
    assert m.state.role is Role.IDLE


def test_release_for_another_ce_or_older_epoch_is_ignored(m):
    m.handle(recruit(epoch=2))
    assert m.handle(ns.Release("other", 5)) == []
    assert m.handle(ns.Release("ce1", 1)) == []
    assert m.state.role is Role.WORKER


def test_lease_expiry_frees_orphaned_worker(m):
    m.handle(recruit(now=0.0, lease=10.0))
    assert m.handle(ns.Tick(9.0)) == []
    m.handle(ns.RenewLease("ce1", 1, 10.0, now=9.0))
    assert m.handle(ns.Tick(15.0)) == []
    actions = m.handle(ns.Tick(19.5))
    assert actions[0] == ns.Publish(Role.IDLE)
    assert isinstance(actions[1], ns.LeftCE)


def test_owner_busy_withdraws_idle_and_refuses_recruits(m):
    assert m.handle(ns.OwnerBusy()) == [ns.Withdraw()]
    assert m.handle(ns.OwnerBusy()) == []
    assert m.handle(recruit()) == [ns.Refused("ce1", "the owner is using this machine")]
    assert m.handle(ns.OwnerFree()) == [ns.Publish(Role.IDLE)]


def test_owner_busy_while_working_reclaims_and_stays_out_after_release(m):
    m.handle(recruit())
    assert m.handle(ns.OwnerBusy()) == [ns.OwnerReclaims("ce1")]
    assert m.handle(ns.Release("ce1", 1)) == [ns.Withdraw(), ns.LeftCE("ce1", "released by the coordinator")]


def test_coordinate_and_end(m):
    acts = m.handle(ns.Coordinate("ce9", 1, bus="mqtt://h:1", data="http://h:2"))
    assert acts == [ns.Publish(Role.COORDINATOR, ce="ce9", epoch=1, bus="mqtt://h:1", data="http://h:2")]
    assert m.handle(ns.EndCoordination("ce9")) == [ns.Publish(Role.IDLE)]


def test_worker_takes_over_its_own_ce_only_with_higher_epoch(m):
    m.handle(recruit("ce1", epoch=1))
    with pytest.raises(ns.InvalidTransition):
        m.handle(ns.Coordinate("ce2", 1))
    with pytest.raises(ns.InvalidTransition):
        m.handle(ns.Coordinate("ce1", 1))
    assert m.handle(ns.Coordinate("ce1", 2))[0].role is Role.COORDINATOR


def test_a_job_submitted_on_a_worker_takes_the_node_out_of_the_other_ce(m):
    m.handle(recruit("ce1", epoch=1))
    acts = m.handle(ns.Coordinate("mine", 1, preempts=True))
    assert acts == [ns.Publish(Role.COORDINATOR, ce="mine", epoch=1),
                    ns.LeftCE("ce1", "left for a job submitted on this node")]
    assert m.state.role is Role.COORDINATOR and m.state.ce == "mine" and m.state.coordinator is None
    assert m.handle(ns.Release("ce1", 1)) == []  # the old CE's release finds nothing to end
    with pytest.raises(ns.InvalidTransition):  # one job per node: a coordinator is not preempted
        m.handle(ns.Coordinate("other", 1, preempts=True))


def test_shutdown_withdraws_and_refuses_everything_after(m):
    m.handle(recruit())
    acts = m.handle(ns.Shutdown())
    assert acts == [ns.Withdraw(), ns.LeftCE("ce1", "node shutting down"), ns.Stopped()]
    assert m.handle(recruit("ce2")) == [ns.Refused("ce2", "node is stopping")]
    assert m.handle(ns.OwnerFree()) == []


def test_resources_changed_refreshes_only_a_published_service(m):
    assert m.handle(ns.ResourcesChanged()) == [ns.RefreshResources()]
    m.handle(ns.OwnerBusy())
    assert m.handle(ns.ResourcesChanged()) == []


def test_exactly_one_service_whatever_the_event_sequence():
    """Random walks: the published service always equals what the state implies."""
    import random

    rng = random.Random(7)
    for _ in range(200):
        m = ns.NodeMachine("n")
        published = m.start()[-1]
        for step in range(60):
            ev = rng.choice([
                ns.OwnerBusy(), ns.OwnerFree(), recruit(rng.choice(["a", "b"]), rng.randint(1, 3), now=step),
                ns.Release(rng.choice(["a", "b"]), rng.randint(1, 3)), ns.Tick(step * rng.random() * 3),
                ns.Coordinate(rng.choice(["a", "c"]), rng.randint(1, 4), preempts=rng.random() < 0.5),
                ns.EndCoordination(rng.choice(["a", "c"])),
                ns.RenewLease("a", 2, 5.0, now=step),
            ])
            try:
                actions = m.handle(ev)
            except ns.InvalidTransition:
                continue
            for a in actions:
                if isinstance(a, (ns.Publish, ns.Withdraw)):
                    published = a
            expected = m.state.service() or ns.Withdraw()
            assert published == expected
