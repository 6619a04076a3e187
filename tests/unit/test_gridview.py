import time

from bonjourgrid.announcement import Announcement, Role
from bonjourgrid.gridkey import GridKey
from bonjourgrid.gridview import MAX_IGNORED, GridView

KEY = GridKey.generate()


def ann(role=Role.IDLE, ts=None, node_id="0123456789abcdef", **kw):
    return Announcement(grid="lab", node_id=node_id, host="pc", role=role, cpus=2, memory_mib=100, free_slots=2,
                        free_memory_mib=100, load=0.0, os="linux", arch="x86_64",
                        timestamp_ms=ts or int(time.time() * 1000), **kw)


def offer(view, a, key=KEY):
    raw = {k.encode(): v.encode() for k, v in a.to_txt(key).items()}
    return view.offer(a.service_type, a.instance_name, raw, ("10.0.0.1",), 4000, time.time())


def test_state_change_and_goodbye_of_the_old_service():
    v = GridView("lab", KEY)
    idle = ann()
    offer(v, idle)
    worker = ann(Role.WORKER, ts=idle.timestamp_ms + 1, ce="c1", coordinator="fedcba9876543210", epoch=1)
    offer(v, worker)
    assert v.nodes[idle.node_id].ann.role is Role.WORKER
    assert v.remove(idle.instance_name) is None  # the Idle goodbye arrives late: node stays
    assert idle.node_id in v.nodes
    assert v.remove(worker.instance_name) is not None
    assert v.nodes == {}


def test_replayed_older_record_never_wins():
    v = GridView("lab", KEY)
    new = ann(Role.WORKER, ce="c1", coordinator="fedcba9876543210", epoch=1)
    offer(v, new)
    assert offer(v, ann(ts=new.timestamp_ms - 1000)) is None
    assert v.nodes[new.node_id].ann.role is Role.WORKER
    assert v.dropped["replayed"] == 1


def test_the_state_a_node_just_left_read_again_is_dropped_quietly(caplog):
    v = GridView("lab", KEY)
    worker = ann(Role.WORKER, ce="c1", coordinator="fedcba9876543210", epoch=1)
    offer(v, worker)
    idle = ann(ts=worker.timestamp_ms + 1)
    offer(v, idle)
    v.remove(worker.instance_name)  # the worker service's goodbye
    with caplog.at_level("WARNING"):
        assert offer(v, worker) is None  # its last record, again, from the mDNS cache
    assert v.nodes[idle.node_id].ann.role is Role.IDLE
    assert v.dropped == {"superseded": 1} and v.ignored == {} and not caplog.records
    older = ann(Role.WORKER, ts=worker.timestamp_ms - 1000, ce="c1", coordinator="fedcba9876543210", epoch=1)
    assert offer(v, older) is None  # older than anything seen for that service: a replay
    assert v.dropped["replayed"] == 1 and v.ignored == {older.instance_name: "replayed"}


def test_ignored_services_are_counted_once_per_service_and_bounded():
    v = GridView("lab", KEY)
    other = GridKey.generate()
    for _ in range(3):
        offer(v, ann(node_id="1111111111111111"), key=other)
    assert v.ignored_summary() == {"wrong-key": 1}
    assert v.dropped["wrong-key"] == 3
    for i in range(MAX_IGNORED + 50):
        offer(v, ann(node_id=f"{i:016x}"), key=other)
    assert len(v.ignored) == MAX_IGNORED


def test_after_a_late_goodbye_the_state_a_node_left_does_not_bring_it_back_and_its_newest_record_does():
    """A desktop between two short jobs: idle, worker, idle again within half a second. The goodbye of
    its first idle registration arrives after the second one, and takes the node out of the view."""
    v = GridView("lab", KEY)
    first_idle = ann()
    offer(v, first_idle)
    worker = ann(Role.WORKER, ts=first_idle.timestamp_ms + 1, ce="c1", coordinator="fedcba9876543210", epoch=1)
    offer(v, worker)
    idle = ann(ts=worker.timestamp_ms + 1)
    offer(v, idle)
    assert v.remove(idle.instance_name) is not None  # the late goodbye
    assert offer(v, worker) is None and offer(v, first_idle) is None  # read again from a cache: stale
    assert idle.node_id not in v.nodes
    back = v.restore(idle.instance_name)  # the idle service was announced again after the goodbye
    assert back is not None and back.ann == idle and v.nodes[idle.node_id].ann.role is Role.IDLE
    assert v.remove(idle.instance_name) is not None  # and a later goodbye still takes it out
    assert v.restore(worker.instance_name) is None  # a service the node is not in now is no way back


def test_txt_properties_reads_what_zeroconf_writes():
    from zeroconf import ServiceInfo

    from bonjourgrid.mdns import txt_properties

    info = ServiceInfo("_x._tcp.local.", "a._x._tcp.local.", port=1, server="h.local.",
                       properties={"k": "v=w", "flag": None, "empty": ""}, parsed_addresses=["10.0.0.1"])
    assert txt_properties(info.text) == dict(info.properties) == {b"k": b"v=w", b"flag": None, b"empty": b""}
    assert txt_properties(b"\x03a=1\x03a=2\x00") == {b"a": b"1"}  # the first of a key wins; empty strings skipped
