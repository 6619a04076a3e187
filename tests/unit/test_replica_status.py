"""What a node's copy of a CE's journal says about the job (`bonjourgrid jobs` on a former replica)."""

from __future__ import annotations

import time
from pathlib import Path

from bonjourgrid.gridkey import GridKey
from bonjourgrid.jobs import _status_from_journal
from bonjourgrid.journal import Journal
from bonjourgrid.replication import ReplicaStore, choose_replicas


def copy_of_a_running_job(tmp_path: Path, ended: bool = False) -> ReplicaStore:
    ce_dir = tmp_path / "ces" / "job1"
    ce_dir.mkdir(parents=True)
    journal = Journal.open(ce_dir / "journal.db")
    journal.create_job("job1", {"name": "sweep"}, [{"argv": ["true"]}] * 3, submitter="n1", created_at=1.0)
    if ended:
        journal.set_job_state("job1", "done", 2.0)
    journal.close()
    return ReplicaStore(ce_dir, GridKey.generate(), "job1")


def test_a_copy_left_behind_says_left_not_running(tmp_path: Path) -> None:
    store = copy_of_a_running_job(tmp_path)
    assert _status_from_journal(store.dir / "journal.db", "job1")["state"] == "running"
    store.abandon(time.time())
    s = _status_from_journal(store.dir / "journal.db", "job1")
    assert s["state"] == "left" and s["replica"] is True
    assert "left the CE at " in s["message"] and "coordinator has its state" in s["message"]


def test_a_replica_that_is_streamed_to_again_is_live_again(tmp_path: Path) -> None:
    store = copy_of_a_running_job(tmp_path)
    store.abandon(time.time())
    store.apply({"changes": []}, None)  # recruited again by the same CE
    store.close()
    assert _status_from_journal(store.dir / "journal.db", "job1")["state"] == "running"


def test_a_copy_that_got_the_end_keeps_it(tmp_path: Path) -> None:
    store = copy_of_a_running_job(tmp_path, ended=True)
    store.abandon(time.time())
    assert _status_from_journal(store.dir / "journal.db", "job1")["state"] == "done"


def test_a_garbled_marker_still_says_left(tmp_path: Path) -> None:
    store = copy_of_a_running_job(tmp_path)
    (store.dir / "left.json").write_text("{not json")
    s = _status_from_journal(store.dir / "journal.db", "job1")
    assert s["state"] == "left" and s["message"].startswith("this node left the CE: ")


def test_no_copy_no_marker(tmp_path: Path) -> None:
    """A worker that never was a replica leaves nothing behind."""
    store = ReplicaStore(tmp_path / "ces" / "job2", GridKey.generate(), "job2")
    store.abandon(time.time())
    assert not store.dir.exists()


def test_a_marker_that_cannot_be_written_is_logged_not_raised(tmp_path: Path) -> None:
    """Leaving a CE must go on with a full disk (here: a directory where the marker goes)."""
    store = copy_of_a_running_job(tmp_path)
    (store.dir / "left.json").mkdir()
    store.abandon(time.time())
    assert _status_from_journal(store.dir / "journal.db", "job1")["state"] == "running"


def test_a_replica_that_cannot_store_the_journal_is_replaced_while_another_worker_can():
    assert choose_replicas(["w1"], ["w1", "w2", "w3"], 1) == ["w1"]
    assert choose_replicas(["w1"], ["w1", "w2", "w3"], 1, unfit={"w1"}) == ["w2"]
    assert choose_replicas(["w1", "w2"], ["w1", "w2", "w3"], 2, unfit={"w1"}) == ["w2", "w3"]
    # too few others: better a replica that may recover than none
    assert choose_replicas(["w1"], ["w1"], 1, unfit={"w1"}) == ["w1"]
    assert choose_replicas(["w2", "w1"], ["w1", "w2", "w3"], 2, unfit={"w1", "w2"}) == ["w3", "w2"]
    assert choose_replicas([], ["w1", "w2", "w3"], 2, unfit={"w1", "w2"}) == ["w3", "w1"]
