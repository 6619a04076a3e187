import time

from bonjourgrid.announcement import Announcement, Role
from bonjourgrid.gridkey import GridKey
from bonjourgrid.gridview import MAX_IGNORED, GridView

KEY = GridKey.generate()


def ann(role=Role.IDLE, ts=None, node_id="0123456789abcdef", **kw):
    return Announcement(grid="lab", node_id=node_id, host="pc", role=role, cpus=2, memory_mib=100, free_slots=2,
                        free_memory_mib=100, load=0.0, os="linux", arch="x86_64",
                        timestamp_ms=ts or int(time.time() * 1000), **kw)


def raw(a, key=KEY):
    return {k.encode(): v.encode() for k, v in a.to_txt(key).items()}


def offer(view, a, key=KEY, txts=None):
    """`a`'s service resolved, with `txts` the TXT records cached for it (by default, `a`'s own)."""
    return view.offer(a.service_type, a.instance_name, txts or [raw(a, key)], ("10.0.0.1",), 4000, time.time())


def back_from_a_job():
    """A desktop's idle, worker and idle records, signed in that order."""
    first_idle = ann()
    worker = ann(Role.WORKER, ts=first_idle.timestamp_ms + 1, ce="c1", coordinator="fedcba9876543210", epoch=1)
    return first_idle, worker, ann(ts=worker.timestamp_ms + 1)


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
    first_idle, worker, idle = back_from_a_job()
    for a in (first_idle, worker, idle):
        offer(v, a)
    assert v.remove(idle.instance_name) is not None  # the late goodbye
    assert offer(v, worker) is None and offer(v, first_idle) is None  # read again from a cache: stale
    assert idle.node_id not in v.nodes
    back = v.restore(idle.instance_name)  # the idle service was announced again after the goodbye
    assert back is not None and back.ann == idle and v.nodes[idle.node_id].ann.role is Role.IDLE
    assert v.remove(idle.instance_name) is not None  # and a later goodbye still takes it out
    assert v.restore(worker.instance_name) is None  # a service the node is not in now is no way back


def test_of_two_cached_records_of_a_service_the_one_signed_last_wins_whatever_their_order():
    """An idle desktop back from a job: a cache still holds its idle record from before the job
    beside the new one, and must not bring back the old one (it is older than the worker record)."""
    for reverse in (False, True):
        v = GridView("lab", KEY)
        before, worker, after = back_from_a_job()
        offer(v, before)
        offer(v, worker)
        rec = offer(v, after, txts=[raw(before), raw(after)][::-1 if reverse else 1])
        assert rec is not None and rec.ann == after and v.dropped == {}


def test_a_forged_record_cached_beside_the_real_one_is_dropped_and_the_real_one_taken():
    v = GridView("lab", KEY)
    real = ann()
    forged = ann(ts=real.timestamp_ms + 1000)
    rec = offer(v, real, txts=[raw(forged, GridKey.generate()), raw(real)])
    assert rec is not None and rec.ann == real
    assert v.dropped == {"wrong-key": 1}


def test_the_browser_reads_the_new_record_when_a_cache_holds_the_old_one_marked_to_expire():
    """What zeroconf does when a node replaces a record a browser still caches: the old one is
    restamped to expire in a second, so its creation time looks newer than the new one's."""
    from types import SimpleNamespace

    from zeroconf import DNSCache, DNSText, current_time_millis

    from bonjourgrid.mdns import _CLASS_IN, _TYPE_TXT, Browser

    old, new = ann(), ann(ts=int(time.time() * 1000) + 5)
    cache = DNSCache()
    t0 = current_time_millis() - 8000
    unique = _CLASS_IN | 0x8000  # the cache-flush bit
    old_txt = DNSText(old.instance_name, _TYPE_TXT, unique, 4500, _text(old), created=t0)
    new_txt = DNSText(new.instance_name, _TYPE_TXT, unique, 4500, _text(new), created=t0 + 7000)
    cache.async_add_records([old_txt, new_txt])
    cache.async_mark_unique_records_older_than_1s_to_expire(
        {(new.instance_name, _TYPE_TXT, _CLASS_IN)}, [new_txt], current_time_millis())
    browser = Browser(SimpleNamespace(zeroconf=SimpleNamespace(cache=cache)), GridView("lab", KEY))
    txts = browser._live_txts(new.instance_name)
    assert len(txts) == 2  # both live for one more second
    rec = offer(browser.view, new, txts=txts)
    assert rec is not None and rec.ann == new


def _text(a):
    from zeroconf import ServiceInfo
    return ServiceInfo(a.service_type, a.instance_name, port=1, server="h.local.",
                       properties=a.to_txt(KEY), parsed_addresses=["10.0.0.1"]).text


def test_txt_properties_reads_what_zeroconf_writes():
    from zeroconf import ServiceInfo

    from bonjourgrid.mdns import txt_properties

    info = ServiceInfo("_x._tcp.local.", "a._x._tcp.local.", port=1, server="h.local.",
                       properties={"k": "v=w", "flag": None, "empty": ""}, parsed_addresses=["10.0.0.1"])
    assert txt_properties(info.text) == dict(info.properties) == {b"k": b"v=w", b"flag": None, b"empty": b""}
    assert txt_properties(b"\x03a=1\x03a=2\x00") == {b"a": b"1"}  # the first of a key wins; empty strings skipped
