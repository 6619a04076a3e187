"""Pure parts of the CE bus: topics, broker credentials, decoding and drop accounting (no sockets)."""

from __future__ import annotations

import logging

import pytest

from bonjourgrid.broker import mosquitto_config
from bonjourgrid.bus import (
    WILL_MAX_AGE_S,
    BusError,
    Decoder,
    DropLog,
    bus_credentials,
    is_filter,
    parse_url,
    seal_will,
    topic,
)
from bonjourgrid.envelope import BadMessage, Envelope, seal
from bonjourgrid.gridkey import GridKey

NOW = 1_800_000_000.0


@pytest.fixture
def key() -> GridKey:
    return GridKey.generate()


def test_topic_layout() -> None:
    assert topic("g1", "ce7", "task", "offer") == "bg/g1/ce/ce7/task/offer"
    assert topic("g1", "ce7") == "bg/g1/ce/ce7"
    assert topic("g1", "ce7", "worker", "+", "hb") == "bg/g1/ce/ce7/worker/+/hb"
    assert topic("g1", "ce7", "#") == "bg/g1/ce/ce7/#"


@pytest.mark.parametrize(
    "args",
    [("", "ce"), ("g/x", "ce"), ("g", "c+"), ("g", "#"), ("g", "ce", "a/b"), ("g", "ce", "#", "x"), ("g", "ce", "")],
)
def test_topic_refuses_injection(args: tuple[str, ...]) -> None:
    with pytest.raises(ValueError):
        topic(*args)


def test_is_filter() -> None:
    assert is_filter("bg/g/ce/c/+/x") and is_filter("bg/#")
    assert not is_filter("bg/g/ce/c/a+b")


def test_credentials_are_deterministic_and_bound_to_key_grid_ce(key: GridKey) -> None:
    user, pw = bus_credentials(key, "g", "ce1")
    assert (user, pw) == bus_credentials(key, "g", "ce1")
    assert user == "bg/g/ce1" and len(pw) == 64
    assert bus_credentials(key, "g", "ce2")[1] != pw
    assert bus_credentials(key, "h", "ce1")[1] != pw
    assert bus_credentials(GridKey.generate(), "g", "ce1")[1] != pw
    assert key.secret.hex() not in pw


def test_parse_url() -> None:
    assert parse_url("mqtt://10.0.0.2:1884") == ("10.0.0.2", 1884)
    assert parse_url("mqtt://[::1]:1885") == ("::1", 1885)
    assert parse_url("host") == ("host", 1883)
    for bad in ("http://h:1", "mqtt://:12", "mqtt://h:notaport"):
        with pytest.raises(BusError):
            parse_url(bad)


def _env(i: int = 0) -> Envelope:
    return Envelope("task", "n1", {"i": i}, ce="ce1", epoch=1)


def test_decoder_accepts_good_and_refuses_bad(key: GridKey) -> None:
    d = Decoder(key, "g")
    data = seal(key, "g", _env(), NOW)
    env, is_will = d.open(data, NOW + 1)
    assert env.body == {"i": 0} and not is_will
    cases = {
        "replayed": data,
        "bad-signature": seal(GridKey.generate(), "g", _env(1), NOW),
        "stale": seal(key, "g", _env(2), NOW - 120),
        "malformed": b"\x00garbage",
        "other-grid": seal(key, "h", _env(3), NOW),
    }
    for reason, payload in cases.items():
        with pytest.raises(BadMessage) as ei:
            d.open(payload, NOW + 1)
        assert ei.value.reason == reason


def test_will_is_accepted_long_after_connect_but_only_once(key: GridKey) -> None:
    d = Decoder(key, "g")
    will = seal_will(key, "g", Envelope("member.lost", "n1"), "sess-1", NOW)
    env, is_will = d.open(will, NOW + 3600)  # fired an hour after it was sealed
    assert is_will and env.kind == "member.lost" and env.nonce == "sess-1"
    with pytest.raises(BadMessage) as ei:
        d.open(will, NOW + 3601)
    assert ei.value.reason == "replayed"
    with pytest.raises(BadMessage) as ei:
        Decoder(key, "g").open(will, NOW + WILL_MAX_AGE_S + 10)
    assert ei.value.reason == "stale"


def test_ordinary_message_never_passes_as_will(key: GridKey) -> None:
    """An old captured message stays stale: only the will key buys the long window."""
    old = seal(key, "g", _env(), NOW)
    with pytest.raises(BadMessage) as ei:
        Decoder(key, "g").open(old, NOW + 600)
    assert ei.value.reason == "stale"
    forged_will = seal_will(GridKey.generate(), "g", Envelope("member.lost", "n1"), "s", NOW)
    with pytest.raises(BadMessage) as ei:
        Decoder(key, "g").open(forged_will, NOW)
    assert ei.value.reason == "bad-signature"


def test_drop_log_counts_all_and_rate_limits_logging(caplog: pytest.LogCaptureFixture) -> None:
    t = [0.0]
    drops = DropLog(logging.getLogger("t.bus"), interval=10.0, clock=lambda: t[0])
    with caplog.at_level(logging.WARNING, logger="t.bus"):
        assert drops.drop("bad-signature", "forged", "bg/g/ce/c/x")
        for _ in range(50):
            assert not drops.drop("bad-signature", "forged", "bg/g/ce/c/x")
        assert drops.drop("stale", "old", "bg/g/ce/c/x")  # another reason has its own budget
        t[0] = 11.0
        assert drops.drop("bad-signature", "forged", "bg/g/ce/c/x")
    assert drops.counts == {"bad-signature": 52, "stale": 1}
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3
    assert "+50 more" in lines[-1]


def test_mosquitto_config_sets_nodelay_and_auth(tmp_path) -> None:
    conf = mosquitto_config(18830, "127.0.0.1", tmp_path / "pw")
    assert "set_tcp_nodelay true" in conf
    assert "listener 18830 127.0.0.1" in conf
    assert "allow_anonymous false" in conf and f"password_file {tmp_path / 'pw'}" in conf
    assert "allow_anonymous true" in mosquitto_config(1, "127.0.0.1")
