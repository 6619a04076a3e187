from bonjourgrid.resources import AnnounceThrottle, Resources, ThrottlePolicy, probe_capabilities
from bonjourgrid.units import format_size, parse_size


def test_throttle_ignores_noise_and_rate_limits():
    th = AnnounceThrottle(ThrottlePolicy(min_interval=10, max_age=600, load_step=0.15), memory_lent_mib=1000)
    r0 = Resources(4, 1000, 0.10)
    assert th.should_announce(r0, 0)
    th.announced(r0, 0)
    assert not th.should_announce(Resources(4, 990, 0.20), 20)  # noise
    assert not th.should_announce(Resources(4, 1000, 0.90), 5)  # significant but too soon
    assert th.should_announce(Resources(4, 1000, 0.90), 11)
    assert th.should_announce(Resources(3, 1000, 0.10), 1)  # a slot change goes out at once
    assert th.should_announce(r0, 601)  # re-signed periodically


def test_capabilities_include_probed_and_tags():
    caps = probe_capabilities({"site": "lab1", "fast": ""})
    assert "linux" in caps and any(c.startswith("python3.") for c in caps)
    assert "site=lab1" in caps and "fast" in caps


def test_sizes():
    assert parse_size("512M") == 512 << 20
    assert parse_size("4GiB") == 4 << 30
    assert parse_size("1.5g") == int(1.5 * (1 << 30))
    assert parse_size("100") == 100
    assert format_size(4 << 30) == "4G"
    import pytest

    for bad in ("", "12X", "-1G", "G"):
        with pytest.raises(ValueError):
            parse_size(bad)
