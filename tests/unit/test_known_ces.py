"""The CE epochs a node remembers survive its daemon: a restarted desktop still refuses a stale coordinator."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from bonjourgrid import nodestate as ns
from bonjourgrid.gridkey import GridKey
from bonjourgrid.node import KNOWN_FILE, NodeConfig, NodeDaemon, load_known_ces, save_known_ces


def daemon(state_dir: Path) -> NodeDaemon:
    return NodeDaemon(NodeConfig("test", GridKey.generate(), state_dir, ["127.0.0.1"], 1, 100))


def test_a_restarted_node_refuses_the_coordinator_its_ce_replaced(tmp_path: Path) -> None:
    before = ns.NodeMachine("n1")
    before.handle(ns.Recruit("ce1", "c1", 1, 10.0, 0.0))
    before.handle(ns.RenewLease("ce1", 2, 10.0, now=1.0, coordinator="c2"))  # followed the successor
    before.handle(ns.Release("ce1", 2))
    save_known_ces(tmp_path, before.state.known)

    after = daemon(tmp_path).machine  # the daemon started again on the same state directory
    [refused] = after.handle(ns.Recruit("ce1", "c1", 1, 10.0, 5.0))
    assert refused.moved_to == (2, "c2")
    assert isinstance(after.handle(ns.Recruit("ce2", "c3", 1, 10.0, 5.0))[-1], ns.Accepted)


def test_a_damaged_memory_is_dropped_with_a_warning_not_a_crash(tmp_path: Path, caplog) -> None:
    path = tmp_path / KNOWN_FILE
    caplog.set_level(logging.WARNING)
    path.write_text("{not json")
    assert load_known_ces(tmp_path) == ()
    path.write_text(json.dumps([["ce1", 3, "c2"], ["ce2", "3", "c2"], ["ce3", True, ""], ["ce4", 1, None]]))
    assert load_known_ces(tmp_path) == (("ce1", 3, "c2"),)
    path.write_text(json.dumps([["ce1", 3]]))
    assert load_known_ces(tmp_path) == ()
    assert "unreadable" in caplog.text and "dropped 3 malformed" in caplog.text
    assert daemon(tmp_path).machine.state.known == ()


def test_no_memory_yet_is_an_empty_one(tmp_path: Path) -> None:
    assert load_known_ces(tmp_path) == ()
    assert daemon(tmp_path).machine.state.known == ()
