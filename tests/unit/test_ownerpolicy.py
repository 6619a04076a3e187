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
