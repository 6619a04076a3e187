import time

import pytest

from bonjourgrid.announcement import (
    MAX_TXT_BYTES,
    SERVICE_TYPES,
    Announcement,
    Rejected,
    Role,
    parse_announcement,
)
from bonjourgrid.gridkey import GridKey

KEY = GridKey.generate()
NOW_MS = int(time.time() * 1000)


def ann(**kw):
    base = dict(grid="lab", node_id="0123456789abcdef", host="pc1", role=Role.IDLE, cpus=4, memory_mib=4096,
                free_slots=4, free_memory_mib=3000, load=0.12, os="linux", arch="x86_64",
                caps=("python3.11", "site=lab1"), timestamp_ms=NOW_MS)
    base.update(kw)
    return Announcement(**base)


def wire(a: Announcement, key=KEY) -> dict[bytes, bytes]:
    return {k.encode(): v.encode() for k, v in a.to_txt(key).items()}


def parse(a_or_raw, service_type=None, instance=None, key=KEY, grid="lab"):
    if isinstance(a_or_raw, Announcement):
        service_type, instance, raw = a_or_raw.service_type, a_or_raw.instance_name, wire(a_or_raw)
    else:
        raw = a_or_raw
    return parse_announcement(service_type, instance, raw, key, grid, NOW_MS)


@pytest.mark.parametrize("role", list(Role))
def test_round_trip_each_role(role):
    extra = {} if role is Role.IDLE else dict(ce="ce-1", epoch=3, coordinator="fedcba9876543210")
    if role is Role.COORDINATOR:
        extra.update(bus="mqtt://10.0.0.2:1883", data="http://10.0.0.2:8080", coordinator=None)
    a = ann(role=role, **extra)
    assert parse(a) == a
    assert len(SERVICE_TYPES[role].split(".")[0]) - 1 <= 15  # RFC 6763 service name limit


def test_small_enough_for_one_packet():
    size = sum(len(k) + len(v) + 2 for k, v in wire(ann()).items())
    assert size < 400


def test_wrong_key_and_other_grid_are_distinguished():
    a = ann()
    with pytest.raises(Rejected) as e:
        parse(a, key=GridKey.generate())
    assert e.value.reason == "wrong-key"
    with pytest.raises(Rejected) as e:
        parse(a, grid="other")
    assert e.value.reason == "other-grid"


def test_any_tampered_field_fails_the_signature():
    raw = wire(ann())
    for field in (b"cpus", b"load", b"caps", b"host", b"ts"):
        bad = dict(raw)
        bad[field] = b"9" if field != b"caps" else b"gpu"
        with pytest.raises(Rejected) as e:
            parse(bad, ann().service_type, ann().instance_name)
        assert e.value.reason == "bad-signature", field


def test_signed_idle_record_cannot_be_replayed_as_coordinator():
    a = ann()
    coord_type = SERVICE_TYPES[Role.COORDINATOR]
    with pytest.raises(Rejected):
        parse(wire(a), coord_type, f"{a.node_id}.{coord_type}")


def test_record_cannot_be_moved_to_another_instance_name():
    a = ann()
    with pytest.raises(Rejected) as e:
        parse(wire(a), a.service_type, f"aaaaaaaaaaaaaaaa.{a.service_type}")
    assert e.value.reason == "malformed"


@pytest.mark.parametrize(
    "raw",
    [
        {},
        {b"grid": b"lab"},
        {b"grid": b"lab", b"id": b"\xff\xfe"},
        {b"\xff": b"x"},
        {b"grid": b"lab", b"id": b"0123456789abcdef", b"sig": b"%%%%"},
        {f"k{i}".encode(): b"v" for i in range(100)},
        {b"grid": b"lab", b"pad": b"x" * (MAX_TXT_BYTES + 10)},
    ],
)
def test_malformed_records_are_rejected_not_crashing(raw):
    a = ann()
    with pytest.raises(Rejected):
        parse(raw, a.service_type, a.instance_name)


def test_authentic_but_nonsense_values_are_rejected():
    with pytest.raises(Rejected) as e:
        parse(ann(load=float("inf")))
    assert e.value.reason == "malformed"


def test_far_future_timestamp_is_refused():
    with pytest.raises(Rejected) as e:
        parse(ann(timestamp_ms=NOW_MS + 3_600_000))
    assert e.value.reason == "future"


def test_worker_must_name_its_ce():
    with pytest.raises(Rejected):
        parse(ann(role=Role.WORKER))


def test_oversized_own_record_is_refused_when_signing():
    with pytest.raises(ValueError, match="exceeds"):
        ann(caps=tuple(f"tag{i}=" + "v" * 50 for i in range(30))).to_txt(KEY)
