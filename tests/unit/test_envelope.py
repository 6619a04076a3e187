import pytest

from bonjourgrid.envelope import BadMessage, Envelope, Opener, seal
from bonjourgrid.gridkey import GridKey

KEY = GridKey.generate()


def test_round_trip():
    data = seal(KEY, "lab", Envelope("recruit", "n1", {"lease": 30}, ce="ce1", epoch=2), now=1000.0)
    env = Opener(KEY, "lab").open(data, now=1000.5)
    assert (env.kind, env.sender, env.body, env.ce, env.epoch) == ("recruit", "n1", {"lease": 30}, "ce1", 2)


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda d: d[:30] + bytes([d[30] ^ 1]) + d[31:], "bad-signature"),
        (lambda d: b"x" * 16 + d[16:], "bad-signature"),
        (lambda d: d[:10], "malformed"),
        (lambda d: b"", "malformed"),
    ],
)
def test_forged_or_broken_messages_are_refused(mutate, reason):
    data = seal(KEY, "lab", Envelope("k", "n1"), now=1000.0)
    with pytest.raises(BadMessage) as e:
        Opener(KEY, "lab").open(mutate(data), now=1000.0)
    assert e.value.reason == reason


def reason(opener, data, now):
    with pytest.raises(BadMessage) as e:
        opener.open(data, now)
    return e.value.reason


def test_wrong_key_replay_stale_and_other_grid():
    data = seal(KEY, "lab", Envelope("k", "n1"), now=1000.0)
    assert reason(Opener(GridKey.generate(), "lab"), data, 1000.0) == "bad-signature"
    op = Opener(KEY, "lab")
    op.open(data, 1000.0)
    assert reason(op, data, 1001.0) == "replayed"
    assert reason(Opener(KEY, "lab"), data, 1200.0) == "stale"
    assert reason(Opener(KEY, "other"), data, 1000.0) == "other-grid"


def test_oversized_is_refused_before_any_parsing():
    op = Opener(KEY, "lab", max_bytes=100)
    with pytest.raises(BadMessage) as e:
        op.open(b"x" * 101, 0.0)
    assert e.value.reason == "oversized"


def test_authentic_but_malformed_body_is_refused():
    import json

    from bonjourgrid.gridkey import sign

    payload = json.dumps({"v": 1, "grid": "lab", "kind": 3, "from": "x", "ts": 0, "nonce": "n", "body": {}}).encode()
    with pytest.raises(BadMessage) as e:
        Opener(KEY, "lab").open(sign(KEY.derive("msg"), payload) + payload, 0.0)
    assert e.value.reason == "malformed"
