import time

from bonjourgrid.cli_jobs import STREAM_EVERY_BUSY_S, stream_due
from bonjourgrid.resources import SpareCpu


def test_results_stream_at_once_when_the_machine_has_cpu_to_spare():
    assert stream_due(0.25, spare_cores=1.5)
    assert stream_due(0.25, spare_cores=0.5)


def test_on_a_busy_machine_results_wait_but_never_longer_than_the_bound():
    assert not stream_due(0.25, spare_cores=0.1)
    assert not stream_due(STREAM_EVERY_BUSY_S - 0.01, spare_cores=0.0)
    assert stream_due(STREAM_EVERY_BUSY_S, spare_cores=0.0)


def test_spare_cpu_is_measured_between_two_readings():
    gauge = SpareCpu()
    assert gauge.cores(time.monotonic()) == 0.0  # nothing to compare with yet
    end = time.monotonic() + 0.3
    while time.monotonic() < end:  # this process keeps one core busy
        pass
    spare = gauge.cores(time.monotonic())
    assert 0.0 <= spare <= gauge.machine_cpus - 0.5
