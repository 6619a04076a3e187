"""The grid node daemon on real namespaced hosts: discovery, goodbyes, owner policy, isolation, hostile input."""

from __future__ import annotations

import os
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest
from conftest import make_key

from bonjourgrid.testbed import wait_for

HOSTILE = str(Path(__file__).with_name("hostile_mdns.py"))


def everyone_sees(nodes, expected: dict[str, str]) -> bool:
    return all(n.sees() == expected for n in nodes)


def test_five_hosts_see_each_other_as_idle(grid):
    g = grid(5)
    t0 = time.monotonic()
    nodes = g.start_all()
    expected = {f"host{i}": "idle" for i in range(1, 6)}
    wait_for(lambda: everyone_sees(nodes, expected), 30, 0.2, "every node to see all five")
    print(f"five nodes saw each other {time.monotonic() - t0:.1f}s after launch")
    # A fresh browser (no daemon) sees the same grid.
    r = nodes[0].cli("nodes", "--json", "--browse", "--timeout", "1.5")
    import json

    listed = json.loads(r.stdout)
    assert {n["host"]: n["state"] for n in listed} == expected
    n0 = next(n for n in listed if n["host"] == "host1")
    assert n0["grid"] == "default" and n0["addresses"] == ["10.213.0.1"] and n0["cpus"] >= 1
    assert set(n0) >= {"id", "host", "addresses", "state", "grid", "cpus", "memory", "load", "caps", "ce"}


def test_sigterm_sends_a_goodbye_seen_at_once(grid):
    g = grid(3)
    a, b, c = g.start_all()
    wait_for(lambda: len(a.sees()) == 3, 20, 0.2, "three nodes")
    sent = datetime.now()
    b.proc.signal(15)
    assert b.proc.popen.wait(10) == 0
    wait_for(lambda: "host2" not in a.sees() and "host2" not in c.sees(), 10, 0.1, "host2 to vanish")
    assert "withdrawing" in b.proc.output()
    for n in (a, c):
        # the daemons' own logs say when they heard the goodbye: at once, not after a TTL (minutes)
        line = next(ln for ln in n.proc.output().splitlines() if "grid: removed host2" in ln)
        heard = datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")
        assert (heard - sent).total_seconds() < 1.5, line


def test_owner_busy_node_leaves_idle_and_comes_back(grid):
    g = grid(2)
    watcher = g.start(g.testbed.hosts[0])
    busy = g.start(g.testbed.hosts[1], "--owner-cpu", "60", "--owner-busy-after", "1", "--owner-free-after", "1")
    wait_for(lambda: watcher.sees().get("host2") == "idle", 20, 0.2, "host2 idle")
    # The owner starts using the machine: every core at 100%.
    burners = [g.testbed.hosts[1].spawn([sys.executable, "-c", "while True: pass"], f"burner{i}")
               for i in range(os.cpu_count() or 1)]
    try:
        wait_for(lambda: "host2" not in watcher.sees(), 30, 0.2, "host2 to withdraw")
        assert "the owner needs this machine (" in busy.proc.output()
        # and its own `nodes` says why it is missing from the table
        shown = " ".join(busy.cli("nodes").stdout.split())  # the table's caption, folded to the terminal
        assert "this node (host2) is not lent to the grid: the owner needs it (" in shown, shown
        assert "% CPU outside the grid)" in shown, shown
    finally:
        for b in burners:
            b.kill()
    wait_for(lambda: watcher.sees().get("host2") == "idle", 30, 0.2, "host2 back to idle")
    assert busy.proc.alive()


def test_a_node_whose_disk_is_below_the_reserve_at_start_is_never_announced(grid):
    """Not even for the seconds before its first sample: a recruiter could pick it in that time."""
    g = grid(3)
    watcher = g.start(g.testbed.hosts[0])
    full = g.start(g.testbed.hosts[1], "--disk-reserve", "500T")  # more than any disk here has free
    g.start(g.testbed.hosts[2])  # started after it: once the watcher sees this one, it would have seen host2
    wait_for(lambda: "host3" in watcher.sees(), 20, 0.2, "host3")
    assert "host2" not in watcher.proc.output()
    log = full.proc.output()
    assert log.index("below the 500T kept for the owner): not lending it") < log.index(" up on ")
    shown = " ".join(full.cli("nodes").stdout.split())
    assert "this node (host2) is not lent to the grid" in shown, shown


def test_two_grids_on_one_network_do_not_see_each_other(grid, tmp_path):
    g = grid(4)
    h = g.testbed.hosts
    other_key = make_key(tmp_path / "other.key")
    a = [g.start(h[0], grid="physics"), g.start(h[1], grid="physics")]
    b = [g.start(h[2], grid="biology", key_file=other_key), g.start(h[3], grid="biology", key_file=other_key)]
    wait_for(lambda: everyone_sees(a, {"host1": "idle", "host2": "idle"}), 20, 0.2, "physics grid")
    wait_for(lambda: everyone_sees(b, {"host3": "idle", "host4": "idle"}), 20, 0.2, "biology grid")
    _, ignored = a[0].view()
    assert ignored.get("other-grid") == 2


def test_announcement_with_a_wrong_key_is_ignored(grid, tmp_path):
    g = grid(3)
    h = g.testbed.hosts
    good = [g.start(h[0]), g.start(h[1])]
    intruder = g.start(h[2], key_file=make_key(tmp_path / "intruder.key"))  # same grid name, other key
    wait_for(lambda: intruder.sees().get("host3") == "idle", 20, 0.2, "intruder sees itself")

    def ignored_wrong_key():
        nodes, ignored = good[0].view()
        return {n["host"] for n in nodes} == {"host1", "host2"} and ignored.get("wrong-key") == 1

    wait_for(ignored_wrong_key, 20, 0.2, "the intruder to be ignored as wrong-key")
    r = good[1].cli("nodes")
    assert "ignored 1 service(s): wrong-key 1" in r.stdout.replace("\n", " ")


def test_forged_records_and_garbage_packets_do_not_crash_nodes(grid):
    g = grid(3)
    h = g.testbed.hosts
    nodes = [g.start(h[0]), g.start(h[1])]
    wait_for(lambda: everyone_sees(nodes, {"host1": "idle", "host2": "idle"}), 20, 0.2, "two nodes")
    forger = h[2].spawn([sys.executable, HOSTILE, "forged", "30"], "forger")
    noise = h[2].spawn([sys.executable, HOSTILE, "garbage", "4"], "garbage")
    wait_for(lambda: not noise.alive(), 30, 0.2, "garbage sender to finish")
    assert "sent" in noise.output(), noise.output()

    def forged_ignored():
        listed, ignored = nodes[0].view()
        return ignored.get("bad-signature") == 1 and {n["host"] for n in listed} == {"host1", "host2"}

    wait_for(forged_ignored, 20, 0.2, "the forged record to be ignored")
    forger.kill()
    for n in nodes:
        assert n.proc.alive(), n.proc.output()[-3000:]
    # still fully working: a state change is still seen
    late = g.start(h[2])
    wait_for(lambda: nodes[0].sees().get("host3") == "idle", 20, 0.2, "a new node after the attack")
    assert late.proc.alive()


@pytest.mark.parametrize("signal_number", [9])
def test_killed_node_is_not_removed_by_mdns_but_others_survive(grid, signal_number):
    """SIGKILL sends no goodbye: mDNS keeps the record (why liveness is judged on the CE bus)."""
    g = grid(2)
    a, b = g.start_all()
    wait_for(lambda: len(a.sees()) == 2, 20, 0.2, "two nodes")
    b.proc.signal(signal_number)
    b.proc.popen.wait(5)
    time.sleep(1.0)
    assert a.proc.alive()
    assert "host2" in a.sees()
