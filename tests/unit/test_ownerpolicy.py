import pytest

from bonjourgrid.ownerpolicy import OwnerMonitor, OwnerPolicy


def feed(mon, samples):
    return [v for t, cpu in samples if (v := mon.observe(t, cpu)) is not None]


def test_busy_only_after_sustained_load_and_free_only_after_sustained_calm():
    mon = OwnerMonitor(OwnerPolicy(cpu_threshold=25, busy_after=10, free_after=30))
    # a short burst does nothing
    assert feed(mon, [(0, 90), (5, 90), (6, 5), (12, 5)]) == []
    # sustained: busy after 10 s
    assert feed(mon, [(20, 80), (25, 80), (29, 80), (30, 80)]) == [True]
    # calm for less than 30 s, then load again: still busy
    assert feed(mon, [(40, 5), (60, 5), (65, 70), (70, 5)]) == []
    assert feed(mon, [(99, 5), (100, 5)]) == [False]


def test_threshold_100_disables_the_policy():
    mon = OwnerMonitor(OwnerPolicy(cpu_threshold=100, busy_after=0))
    assert feed(mon, [(0, 100), (100, 100)]) == []


@pytest.mark.parametrize("kw", [dict(cpu_threshold=-1), dict(cpu_threshold=101), dict(busy_after=-1)])
def test_bad_policies_are_refused(kw):
    with pytest.raises(ValueError):
        OwnerPolicy(**kw)


def test_a_disk_below_the_reserve_is_the_owners_at_once_and_lendable_after_free_after():
    mon = OwnerMonitor(OwnerPolicy(cpu_threshold=100, free_after=30, disk_reserve=1000))
    assert mon.observe(0, 0, 5000) is None
    assert mon.observe(1, 0, 999) is True and "below the 1000B kept for the owner" in mon.reason
    assert mon.observe(10, 0, 5000) is None  # back above: not yet
    assert mon.observe(20, 0, 900) is None  # below again: the wait starts over
    assert mon.observe(30, 0, 5000) is None
    assert mon.observe(59, 0, 5000) is None
    assert mon.observe(60, 0, 5000) is False


def test_the_machine_is_lendable_only_when_both_cpu_and_disk_say_so():
    mon = OwnerMonitor(OwnerPolicy(cpu_threshold=25, busy_after=0, free_after=0, disk_reserve=1000))
    assert mon.observe(0, 90, 5000) is True  # the CPU
    assert mon.observe(1, 90, 10) is None  # and the disk
    assert mon.observe(2, 5, 10) is None  # the CPU is free again, the disk is not
    assert mon.observe(3, 5, 5000) is False


def test_a_reserve_of_zero_or_no_disk_sample_turns_the_disk_rule_off():
    assert OwnerMonitor(OwnerPolicy(cpu_threshold=100, disk_reserve=0)).observe(0, 0, 0) is None
    assert OwnerMonitor(OwnerPolicy(cpu_threshold=100)).observe(0, 0, None) is None
