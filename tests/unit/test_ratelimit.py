"""A lasting condition is said once a period, the first time at once."""

from __future__ import annotations

from bonjourgrid import ratelimit
from bonjourgrid.ratelimit import Sometimes


def test_said_at_once_then_once_per_period(monkeypatch) -> None:
    now = [1000.0]
    monkeypatch.setattr(ratelimit.time, "monotonic", lambda: now[0])
    say = Sometimes(60.0)
    said = []
    for _ in range(150):  # a retry every second for 150 s
        said.append(say())
        now[0] += 1.0
    assert [i for i, s in enumerate(said) if s] == [0, 60, 120]


def test_a_fresh_limiter_says_it_whatever_the_clock() -> None:
    assert Sometimes(1e9)() is True  # monotonic clocks may start near zero
