"""The queue of jobs submitted on a busy node: on disk, in order, with the inputs as submitted."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import pytest

from bonjourgrid.jobqueue import JOURNAL_FILE, QUEUED_MARKER, STATUS_FILE, JobQueue, QueueError
from bonjourgrid.jobspec import sweep_job
from bonjourgrid.retention import SUBMITTED_HERE


def job(tmp_path: Path, n: int = 2, *inputs: str):
    return sweep_job(["echo", "{i}"], n, base_dir=tmp_path, inputs=list(inputs) or None)


def test_queued_jobs_come_back_after_a_restart_in_the_order_submitted(tmp_path: Path) -> None:
    root = tmp_path / "ces"
    q = JobQueue(root)
    for name in ("zz-first", "aa-second", "mm-third"):
        q.add(name, job(tmp_path), None)
    q.add("with-broker", job(tmp_path, 5), "mqtt://10.0.0.9:1883")
    again = JobQueue(root)
    again.load()
    assert [j.job_id for j in again.jobs] == ["zz-first", "aa-second", "mm-third", "with-broker"]
    last = again.jobs[-1]
    assert last.broker == "mqtt://10.0.0.9:1883" and len(last.spec.tasks) == 5
    assert last.spec == q.jobs[-1].spec
    assert (root / "zz-first" / SUBMITTED_HERE).is_file()  # the owner's: retention never removes it


def test_inputs_are_staged_when_queued_so_later_changes_do_not_reach_the_job(tmp_path: Path) -> None:
    data = tmp_path / "data.txt"
    data.write_text("as submitted")
    q = JobQueue(tmp_path / "ces")
    queued = q.add("j", job(tmp_path, 2, str(data)), None)
    data.write_text("changed later")
    (entry,) = queued.inputs
    assert entry["dest"] == "data.txt" and entry["sha256"] == hashlib.sha256(b"as submitted").hexdigest()
    assert (tmp_path / "ces" / "j" / "inputs" / entry["sha256"]).read_text() == "as submitted"


def test_a_job_that_cannot_be_queued_leaves_nothing_behind(tmp_path: Path) -> None:
    data = tmp_path / "data.txt"
    data.write_text("x")
    spec = job(tmp_path, 2, str(data))
    data.unlink()  # gone between the check of the job file and the queueing
    q = JobQueue(tmp_path / "ces")
    with pytest.raises(QueueError, match=r"cannot queue the job: .*data\.txt"):
        q.add("j", spec, None)
    assert q.jobs == [] and not (tmp_path / "ces" / "j").exists()


def test_a_job_that_left_the_queue_before_a_crash_is_not_queued_again(tmp_path: Path) -> None:
    root = tmp_path / "ces"
    q = JobQueue(root)
    for name in ("started", "cancelled", "waiting"):
        q.add(name, job(tmp_path), None)
    (root / "started" / JOURNAL_FILE).write_text("")  # its start created the journal, then the crash
    (root / "cancelled" / STATUS_FILE).write_text("{}")
    again = JobQueue(root)
    again.load()
    assert [j.job_id for j in again.jobs] == ["waiting"]
    assert not (root / "started" / QUEUED_MARKER).exists() and not (root / "cancelled" / QUEUED_MARKER).exists()


def test_a_marker_that_cannot_be_read_is_logged_and_kept_for_its_owner(tmp_path: Path, caplog) -> None:
    root = tmp_path / "ces"
    q = JobQueue(root)
    q.add("good", job(tmp_path), None)
    (root / "torn").mkdir()
    (root / "torn" / QUEUED_MARKER).write_text('{"job": {"name": "x", "tas')
    again = JobQueue(root)
    with caplog.at_level(logging.ERROR):
        again.load()
    assert [j.job_id for j in again.jobs] == ["good"]
    assert "cannot read the queued job" in caplog.text and (root / "torn" / QUEUED_MARKER).exists()


def test_find_remove_and_pop_keep_the_order(tmp_path: Path) -> None:
    q = JobQueue(tmp_path / "ces")
    for name in ("a", "b", "c"):
        q.add(name, job(tmp_path), None)
    assert q.find("c") is not None and q.find("c")[0] == 2
    assert q.remove("b") is not None and q.remove("b") is None
    assert q.find("c")[0] == 1 and q.find("nope") is None
    assert [q.pop().job_id, q.pop().job_id, q.pop()] == ["a", "c", None]
    q.left("a")
    assert not (tmp_path / "ces" / "a" / QUEUED_MARKER).exists()
