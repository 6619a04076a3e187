"""Which node a command follows: this state dir's daemon while it lives, and for a job no coordinator
announces, the best answer of the others (pick_job_holder)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
from collections.abc import AsyncIterator
from typing import Any

from bonjourgrid.gridkey import GridKey
from bonjourgrid.localnode import NODE_FILE, LocalNode, pick_job_holder

REPLICA = "from a replica of the job's journal"


def pick(answers: list[tuple[str, dict[str, Any]]]) -> tuple[str | None, int]:
    """(the node picked, how many answers were read)."""
    read = 0

    async def gen() -> AsyncIterator[tuple[str, dict[str, Any]]]:
        nonlocal read
        for a in answers:
            read += 1
            yield a

    return asyncio.run(pick_job_holder(gen())), read


def replica(state: str) -> dict[str, Any]:
    return {"state": state, "replica": True, "message": REPLICA}


def test_the_last_coordinator_that_knows_the_end_wins_and_ends_the_search():
    picked, read = pick([("r1", replica("done")), ("c", {"state": "done"}), ("r2", replica("done"))])
    assert (picked, read) == ("c", 2)


def test_a_replica_that_knows_the_end_beats_a_node_that_still_says_running():
    assert pick([("old", {"state": "running"}), ("r1", replica("failed"))])[0] == "r1"


def test_while_the_job_runs_a_coordinator_is_followed_rather_than_a_replica():
    """A replica's status lags and lacks live figures (a CI run crashed following one)."""
    assert pick([("r1", replica("running")), ("succ", {"state": "running", "tasks_per_second": 3.0})])[0] == "succ"


def test_a_replica_is_followed_when_nothing_else_knows_the_job():
    assert pick([("gone", {"state": "moved"}), ("r1", replica("running"))])[0] == "r1"


def test_nobody_knows_the_job():
    assert pick([("moved", {"state": "moved"}), ("blank", {})]) == (None, 2)


def test_a_replica_that_left_the_ce_before_its_end_is_never_followed():
    assert pick([("left", replica("left")), ("r1", replica("running"))])[0] == "r1"
    assert pick([("left", replica("left"))])[0] is None


def test_a_state_dir_is_followed_only_while_the_daemon_it_names_lives(tmp_path) -> None:
    key = GridKey.generate()
    gone = _a_dead_pid()
    for pid, found in ((os.getpid(), True), (gone, False), (0, False)):
        (tmp_path / NODE_FILE).write_text(json.dumps({"grid": "lab", "pid": pid, "port": 4242, "node_id": "n1"}))
        node = LocalNode.find(tmp_path, key, "lab")
        assert (node is not None) == found, pid
    assert LocalNode.find(tmp_path, key, "other-grid") is None


def _a_dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()  # reaped: nobody has that pid now (pids are not reused this fast)
    return p.pid
