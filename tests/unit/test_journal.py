"""The coordinator journal on real SQLite files: exactly-once results, retries, durability, replication."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from bonjourgrid.journal import (
    Change,
    FailureOutcome,
    InvalidTransitionError,
    JobConflictError,
    Journal,
    JournalDivergenceError,
    JournalGapError,
    JournalLockedError,
    JournalWriteError,
    OutputFile,
    ResultRecord,
    SchemaVersionError,
    StaleEpochError,
    UnknownTaskError,
)

REPO_ROOT = Path(__file__).resolve().parents[2]


def res(node: str = "n1", attempt: int = 1, code: int = 0, stderr: bytes = b"", stdout: bytes = b"out") -> ResultRecord:
    return ResultRecord(
        exit_code=code,
        started_at=10.0,
        finished_at=12.5,
        node_id=node,
        attempt=attempt,
        stdout=stdout,
        stderr=stderr,
        outputs=(OutputFile("out/a.txt", 3, "ab" * 32),),
        extra={"cpu_s": 1.25},
    )


@pytest.fixture
def journal(tmp_path: Path):
    j = Journal.open(tmp_path / "ce.db")
    yield j
    j.close()


def make_job(j: Journal, job_id: str = "job1", n: int = 4) -> None:
    j.create_job(job_id, {"cmd": ["echo", "hi"]}, [{"arg": i} for i in range(n)], submitter="alice", created_at=1.0)


# ------------------------------------------------------------- opening ----


def test_open_uses_wal_full_sync_for_durable_batches_and_a_schema_version(journal: Journal) -> None:
    conn = journal._conn
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    with journal.batch():
        assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL: the commit syncs
    with journal.batch(durable=False):
        assert conn.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL
    assert conn.execute("PRAGMA synchronous").fetchone()[0] == 1  # what a durable batch sets itself
    assert conn.execute("SELECT MAX(version) FROM schema_version").fetchone()[0] == 1
    assert journal.epoch() == 1
    assert journal.last_seq() == 0


def test_newer_schema_is_refused_and_left_untouched(tmp_path: Path) -> None:
    path = tmp_path / "ce.db"
    Journal.open(path).close()
    with sqlite3.connect(path) as conn:
        conn.execute("INSERT INTO schema_version VALUES (99, 0)")
    with pytest.raises(SchemaVersionError, match="v99"):
        Journal.open(path)
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT MAX(version) FROM schema_version").fetchone()[0] == 99
    Path(f"{path}.lock").unlink()  # the lock is released even when open fails
    with pytest.raises(SchemaVersionError):
        Journal.open(path)


def test_foreign_sqlite_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "other.db"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE something (x)")
    with pytest.raises(SchemaVersionError, match="not a BonjourGrid journal"):
        Journal.open(path)


def test_one_journal_per_file(tmp_path: Path) -> None:
    j = Journal.open(tmp_path / "ce.db")
    with pytest.raises(JournalLockedError):
        Journal.open(tmp_path / "ce.db")
    j.close()
    Journal.open(tmp_path / "ce.db").close()


# ---------------------------------------------------------------- jobs ----


def test_create_job_is_idempotent_and_detects_conflicts(journal: Journal) -> None:
    make_job(journal)
    seq = journal.last_seq()
    make_job(journal)  # resubmission after a lost ack
    assert journal.last_seq() == seq
    with pytest.raises(JobConflictError):
        journal.create_job("job1", {"cmd": ["other"]}, [{"arg": 0}], submitter="alice", created_at=1.0)
    job = journal.job("job1")
    assert job is not None
    assert job.state == "running" and job.n_tasks == 4 and job.submitter == "alice"
    assert job.counts == {"pending": 4, "running": 0, "done": 0, "failed": 0}
    assert journal.job("nope") is None
    assert [t.spec for t in journal.tasks("job1")] == [{"arg": i} for i in range(4)]


def test_job_state_and_counts(journal: Journal) -> None:
    make_job(journal, n=2)
    for i in range(2):
        a = journal.mark_running("job1", i, "n1", 2.0)
        journal.record_result("job1", i, res(attempt=a))
    job = journal.job("job1")
    assert job is not None and job.settled and job.counts["done"] == 2
    journal.set_job_state("job1", "done", at=9.0)
    job = journal.job("job1")
    assert job is not None and job.state == "done" and job.finished_at == 9.0
    with pytest.raises(ValueError):
        journal.set_job_state("job1", "exploded", at=9.0)
    make_job(journal, "job2", n=1)
    assert [j.job_id for j in journal.jobs()] == ["job1", "job2"]


# --------------------------------------------------------------- tasks ----


def test_exactly_once_results(journal: Journal) -> None:
    make_job(journal)
    a1 = journal.mark_running("job1", 0, "n1", 2.0)
    assert a1 == 1
    assert journal.record_result("job1", 0, res("n1", a1)) is True
    seq = journal.last_seq()
    # the same result again, and a result from another (duplicate) execution: both refused
    assert journal.record_result("job1", 0, res("n1", a1)) is False
    assert journal.record_result("job1", 0, res("n2", 7, stdout=b"other")) is False
    assert journal.record_failure("job1", 0, res("n2", 2, code=1), max_failures=3) is FailureOutcome.IGNORED
    assert journal.last_seq() == seq
    stored = journal.result("job1", 0)
    assert stored == res("n1", a1)
    assert journal.task("job1", 0).state == "done"
    with pytest.raises(InvalidTransitionError):
        journal.mark_running("job1", 0, "n3", 3.0)
    assert journal.result("job1", 1) is None


def test_a_batch_of_tasks_starts_as_one_change_and_reports_the_others(journal: Journal) -> None:
    make_job(journal, n=5)
    journal.mark_running("job1", 1, "n1", 1.0)
    journal.record_result("job1", 1, res("n1", 1))
    journal.mark_running("job1", 2, "n1", 1.0)
    seq = journal.last_seq()
    started, refused = journal.mark_running_many("job1", [0, 1, 2, 3, 0], "n2", 2.0)
    assert started == [(0, 1), (3, 1)]
    assert refused == {1: "done", 2: "running"}
    assert journal.last_seq() == seq + 1
    assert [(t.state, t.node_id, t.tried_nodes) for t in journal.tasks("job1")] == [
        ("running", "n2", ("n2",)), ("done", "n1", ("n1",)), ("running", "n1", ("n1",)),
        ("running", "n2", ("n2",)), ("pending", None, ())]
    with pytest.raises(UnknownTaskError):
        journal.mark_running_many("job1", [4, 9], "n2", 3.0)
    assert journal.task("job1", 4).state == "pending" and journal.last_seq() == seq + 1  # nothing half done


def test_a_batch_of_results_stores_each_task_once(journal: Journal) -> None:
    make_job(journal, n=4)
    journal.mark_running_many("job1", [0, 1, 2], "n1", 1.0)
    assert journal.record_result("job1", 2, res("n1", 1)) is True
    seq = journal.last_seq()
    stored = journal.record_results("job1", [(0, res("n1", 1)), (2, res("n1", 1, stdout=b"again")),
                                              (0, res("n2", 2, stdout=b"twice")), (3, res("n3", 1))])
    assert stored == [True, False, False, True]  # a pending task's result counts too (at-least-once)
    assert journal.last_seq() == seq + 1
    assert journal.result("job1", 0) == res("n1", 1) and journal.result("job1", 2) == res("n1", 1)
    assert [t.state for t in journal.tasks("job1")] == ["done", "running", "done", "done"]
    assert journal.record_results("job1", [(0, res("n1", 1))]) == [False] and journal.last_seq() == seq + 1


def test_a_replica_applies_changes_written_one_task_at_a_time(tmp_path: Path) -> None:
    """Journals outlive versions: the per-task ops written before batches still apply, as the batched ones."""
    old, new = Journal.open(tmp_path / "old.db"), Journal.open(tmp_path / "new.db")
    for j in (old, new):
        make_job(j, n=2)
    new.mark_running_many("job1", [0, 1], "n1", 2.0)
    new.record_results("job1", [(0, res("n1", 1)), (1, res("n1", 1))])
    legacy = [{"op": "running", "job": "job1", "task": i, "node": "n1", "attempt": 1, "at": 2.0} for i in (0, 1)]
    legacy += [{"op": "result", "job": "job1", "task": i, "result": res("n1", 1).to_dict()} for i in (0, 1)]
    old.apply([Change(old.last_seq() + 1 + k, 1, p) for k, p in enumerate(legacy)])
    assert old.dump() == new.dump()
    assert [i for c in old.changes_since(0) for i, _ in c.results()] == [0, 1]
    old.close()
    new.close()


def test_late_result_of_an_old_attempt_is_accepted_once(journal: Journal) -> None:
    make_job(journal)
    journal.mark_running("job1", 0, "n1", 1.0)
    journal.requeue("job1", 0, "worker lost")
    journal.mark_running("job1", 0, "n2", 2.0)
    assert journal.record_result("job1", 0, res("n1", 1)) is True  # the lost worker came back first
    assert journal.record_result("job1", 0, res("n2", 2)) is False
    assert journal.result("job1", 0) == res("n1", 1)
    assert [i for i, _ in journal.results("job1")] == [0]


def test_requeue_semantics(journal: Journal) -> None:
    make_job(journal)
    assert journal.mark_running("job1", 1, "n1", 1.0) == 1
    assert journal.requeue("job1", 1, "worker lost") is True
    t = journal.task("job1", 1)
    assert (t.state, t.node_id, t.attempts, t.failures) == ("pending", None, 1, 0)
    assert journal.requeue("job1", 1, "again") is False  # already pending
    assert journal.mark_running("job1", 1, "n2", 2.0) == 2
    assert journal.requeue("job1", 1, "late timeout of attempt 1", attempt=1) is False
    assert journal.task("job1", 1).state == "running"
    journal.record_result("job1", 1, res("n2", 2))
    assert journal.requeue("job1", 1, "too late") is False  # done stays done
    assert journal.task("job1", 1).state == "done"
    assert journal.task("job1", 1).tried_nodes == ("n1", "n2")

    for i in (0, 2, 3):
        journal.mark_running("job1", i, "n9" if i != 2 else "n8", 3.0)
    assert journal.requeue_node("job1", "n9", "node left") == [0, 3]
    assert [t.index for t in journal.pending_tasks("job1", 10)] == [0, 3]
    assert [t.index for t in journal.pending_tasks("job1", 1)] == [0]
    assert [t.index for t in journal.tasks("job1", "running")] == [2]
    with pytest.raises(UnknownTaskError):
        journal.requeue("job1", 42, "x")


def test_failure_and_retry_accounting(journal: Journal) -> None:
    make_job(journal)
    # attempt 1 fails -> requeued; attempt 2 lost with its worker -> requeued, not a failure
    a = journal.mark_running("job1", 0, "n1", 1.0)
    assert journal.record_failure("job1", 0, res("n1", a, 1, b"e1"), max_failures=2) is FailureOutcome.REQUEUED
    assert journal.record_failure("job1", 0, res("n1", a, 1, b"e1"), max_failures=2) is FailureOutcome.IGNORED
    t = journal.task("job1", 0)
    assert (t.state, t.attempts, t.failures, t.tried_nodes) == ("pending", 1, 1, ("n1",))
    a = journal.mark_running("job1", 0, "n2", 2.0)
    journal.requeue_node("job1", "n2", "owner reclaimed the desktop")
    assert journal.task("job1", 0).failures == 1
    # attempt 3 fails -> second failure -> failed for good, last stderr kept
    a = journal.mark_running("job1", 0, "n3", 3.0)
    assert a == 3
    assert journal.record_failure("job1", 0, res("n3", a, 2, b"e3"), max_failures=2) is FailureOutcome.FAILED
    t = journal.task("job1", 0)
    assert (t.state, t.attempts, t.failures, t.tried_nodes) == ("failed", 3, 2, ("n1", "n2", "n3"))
    assert [f.stderr for f in journal.failures("job1", 0)] == [b"e1", b"e3"]
    assert journal.result("job1", 0) is None
    # failed is final: neither a late success nor more failures change it
    assert journal.record_result("job1", 0, res("n2", 2)) is False
    assert journal.record_failure("job1", 0, res("n2", 2, 1), max_failures=2) is FailureOutcome.IGNORED
    job = journal.job("job1")
    assert job is not None and job.counts["failed"] == 1


def test_failure_of_a_stale_attempt_does_not_disturb_the_running_one(journal: Journal) -> None:
    make_job(journal)
    journal.mark_running("job1", 0, "n1", 1.0)
    journal.requeue("job1", 0, "timeout")
    journal.mark_running("job1", 0, "n2", 2.0)
    assert journal.record_failure("job1", 0, res("n1", 1, 1), max_failures=1) is FailureOutcome.COUNTED
    t = journal.task("job1", 0)
    assert (t.state, t.node_id, t.failures) == ("running", "n2", 1)
    assert journal.record_result("job1", 0, res("n2", 2)) is True
    # a failure reported after its task was requeued (pending) counts and may finish it
    journal.mark_running("job1", 1, "n1", 1.0)
    journal.requeue("job1", 1, "worker lost")
    assert journal.record_failure("job1", 1, res("n1", 1, 1), max_failures=2) is FailureOutcome.COUNTED
    assert journal.task("job1", 1).state == "pending"
    journal.mark_running("job1", 1, "n3", 1.0)
    journal.requeue("job1", 1, "worker lost")
    assert journal.record_failure("job1", 1, res("n3", 2, 1), max_failures=2) is FailureOutcome.FAILED


# ------------------------------------------------------ transactions -----


def test_batch_is_one_transaction(journal: Journal) -> None:
    make_job(journal)
    with pytest.raises(RuntimeError), journal.batch():
        journal.mark_running("job1", 0, "n1", 1.0)
        journal.record_result("job1", 0, res())
        raise RuntimeError("crash inside the batch")
    assert journal.task("job1", 0).state == "pending"
    assert journal.last_seq() == 1
    with journal.batch():
        for i in range(4):
            journal.mark_running("job1", i, "n1", 1.0)
        with pytest.raises(InvalidTransitionError):  # a refused op inside a batch leaves the rest intact
            journal.mark_running("job1", 0, "n1", 1.0)
        with journal.batch():  # nested: joins the outer transaction
            journal.record_result("job1", 0, res())
    assert journal.last_seq() == 6
    assert [c.seq for c in journal.changes_since(0)] == list(range(1, 7))


def test_committed_seq_is_readable_while_a_batch_holds_the_lock(journal: Journal) -> None:
    """The event loop reads it while a thread commits: never blocked, never ahead of the disk."""
    import threading

    make_job(journal)
    assert journal.committed_seq == 1
    inside, go_on = threading.Event(), threading.Event()

    def commit() -> None:
        with journal.batch():
            journal.mark_running("job1", 0, "n1", 1.0)
            inside.set()
            go_on.wait(10)

    t = threading.Thread(target=commit)
    t.start()
    assert inside.wait(10)
    assert journal.committed_seq == 1  # the change is not committed yet (and reading did not wait)
    go_on.set()
    t.join(10)
    assert journal.committed_seq == journal.last_seq() == 2
    with pytest.raises(RuntimeError), journal.batch():
        journal.mark_running("job1", 1, "n1", 1.0)
        raise RuntimeError("rolled back")
    assert journal.committed_seq == journal.last_seq() == 2


def test_a_full_database_keeps_nothing_of_the_batch_and_takes_writes_again_later(journal: Journal) -> None:
    """SQLite's own "database or disk is full" (here its page limit): a clear error, a consistent journal."""
    make_job(journal, n=40)
    journal.mark_running_many("job1", list(range(40)), "n1", 2.0)
    conn = journal._conn  # no public knob: the limit stands in for a full disk
    conn.execute(f"PRAGMA max_page_count={conn.execute('PRAGMA page_count').fetchone()[0] + 4}")
    recorded, refused = [], None
    for i in range(40):
        try:
            journal.record_results("job1", [(i, res(stdout=os.urandom(6000)))])
            recorded.append(i)
        except JournalWriteError as e:
            refused = (i, str(e))
            break
    assert refused is not None, "the page limit never bit"
    index, message = refused
    assert "full" in message and str(journal.path) in message
    seq = journal.last_seq()
    assert journal.committed_seq == seq
    assert journal.task("job1", index).state == "running"  # not recorded: its worker sends it again
    assert [i for i, _ in journal.results("job1")] == recorded
    conn.execute("PRAGMA max_page_count=1073741823")  # space again
    assert journal.record_results("job1", [(index, res(stdout=b"again"))]) == [True]
    assert journal.last_seq() == seq + 1 and journal.result("job1", index).stdout == b"again"
    assert [c.seq for c in journal.changes_since(0)] == list(range(1, seq + 2))


def test_state_survives_close_and_reopen(tmp_path: Path) -> None:
    path = tmp_path / "ce.db"
    j = Journal.open(path)
    make_job(j)
    a = j.mark_running("job1", 0, "n1", 1.0)
    j.record_result("job1", 0, res("n1", a, stdout=b"\x00\xffbinary"))
    j.mark_running("job1", 1, "n2", 1.0)
    j.record_failure("job1", 1, res("n2", 1, 3, b"bad"), max_failures=5)
    j.bump_epoch()
    before, seq = j.dump(), j.last_seq()
    j.close()
    j = Journal.open(path)
    assert j.dump() == before
    assert j.last_seq() == seq and j.epoch() == 2
    assert j.result("job1", 0) == res("n1", a, stdout=b"\x00\xffbinary")
    assert j.record_result("job1", 0, res("n1", a)) is False
    j.close()


# ---------------------------------------------------------- durability ----

_CHILD = textwrap.dedent(
    """
    import contextlib, os, signal, sys
    from pathlib import Path
    from bonjourgrid.journal import Journal, ResultRecord
    path, n, kill_self_at, batch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    j = Journal.open(Path(path))
    j.create_job("job", {}, [{"i": i} for i in range(n)], submitter="s", created_at=0.0)
    done = 0
    while done < n:
        size = min(batch, n - done)
        with j.batch() if batch > 1 else contextlib.nullcontext():  # batch == 1: plain record_result
            for i in range(done, done + size):
                a = j.mark_running("job", i, "w", 1.0)
                assert j.record_result("job", i, ResultRecord(0, 1.0, 2.0, "w", a, stdout=b"r%d" % i))
        for i in range(done, done + size):  # acknowledged only once the batch is committed
            sys.stdout.write(f"{i}\\n")
        sys.stdout.flush()
        done += size
        if kill_self_at >= 0 and done > kill_self_at:
            os.kill(os.getpid(), signal.SIGKILL)
    """
)


def _run_child(path: Path, n: int, kill_self_at: int, batch: int, kill_after_acks: int | None) -> set[int]:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    cmd = [sys.executable, "-c", _CHILD, str(path), str(n), str(kill_self_at), str(batch)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout is not None
    acked: set[int] = set()
    for line in proc.stdout:
        acked.add(int(line))
        if kill_after_acks is not None and len(acked) >= kill_after_acks:
            proc.send_signal(signal.SIGKILL)  # asynchronous: lands wherever the child happens to be
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    return acked


@pytest.mark.parametrize(
    ("kill_self_at", "batch", "kill_after_acks"),
    [(17, 1, None), (40, 10, None), (-1, 1, 25), (-1, 7, 60)],
    ids=["self-kill-after-result", "self-kill-after-batch", "parent-kill", "parent-kill-batched"],
)
def test_acknowledged_results_survive_sigkill(
    tmp_path: Path, kill_self_at: int, batch: int, kill_after_acks: int | None
) -> None:
    path = tmp_path / "ce.db"
    acked = _run_child(path, 400, kill_self_at, batch, kill_after_acks)
    assert acked
    j = Journal.open(path)  # also proves the lock died with the child
    try:
        assert j._conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        stored = {i for i, _ in j.results("job")}
        assert acked <= stored
        for i in acked:
            r = j.result("job", i)
            assert r is not None and r.stdout == b"r%d" % i
            assert j.task("job", i).state == "done"
        # the change log is gapless and consistent with the tables after recovery
        changes = j.changes_since(0, limit=10_000)
        assert [c.seq for c in changes] == list(range(1, len(changes) + 1))
        assert sum(len(c.results()) for c in changes) == len(stored)
    finally:
        j.close()


# --------------------------------------------------------- replication ----

NODES = [f"n{i}" for i in range(5)]


def random_ops(j: Journal, rng: random.Random, n_ops: int, prefix: str, t0: float = 100.0) -> None:
    """A seeded random but valid workload, with duplicates and stale reports thrown in."""
    t = t0
    for _ in range(n_ops):
        t += rng.random()
        all_jobs = j.jobs()
        jobs = [job.job_id for job in all_jobs]
        r = rng.random()
        if all(job.settled for job in all_jobs) or r < 0.02:
            job_id = f"{prefix}-{len(jobs)}"
            tasks = [{"i": i, "arg": rng.randint(0, 9)} for i in range(rng.randint(3, 12))]
            j.create_job(job_id, {"cmd": "x", "k": rng.random()}, tasks, submitter="u", created_at=t)
            continue
        job_id = rng.choice(jobs)
        tasks = j.tasks(job_id)
        running = [t for t in tasks if t.state == "running"]
        task = rng.choice(running if running and rng.random() < 0.7 else tasks)
        node = rng.choice(NODES)
        if r < 0.30:
            pending = j.pending_tasks(job_id, 3)
            if pending:
                j.mark_running(job_id, rng.choice(pending).index, node, t)
        elif r < 0.40:  # a worker's batch, some of it maybe not pending any more
            picked = [x.index for x in rng.sample(tasks, min(len(tasks), rng.randint(1, 5)))]
            j.mark_running_many(job_id, picked, node, t)
        elif r < 0.50:
            attempt = max(1, task.attempts - rng.randint(0, 1))
            out = rng.randbytes(rng.randint(0, 40))
            j.record_result(job_id, task.index, res(task.node_id or node, attempt, 0, b"", out))
        elif r < 0.60:  # a results message, maybe with a task twice or one already done
            batch = rng.choices(running or tasks, k=rng.randint(1, 4))
            j.record_results(job_id, [(x.index, res(x.node_id or node, max(1, x.attempts), 0, b"", rng.randbytes(8)))
                                      for x in batch])
        elif r < 0.75:
            attempt = max(1, task.attempts - rng.randint(0, 1))
            err = rng.randbytes(rng.randint(0, 40))
            report = res(task.node_id or node, attempt, 1, err)
            j.record_failure(job_id, task.index, report, max_failures=rng.choice([1, 2, 3]))
        elif r < 0.85:
            j.requeue(job_id, task.index, "timeout", attempt=rng.choice([None, task.attempts]))
        elif r < 0.90:
            j.requeue_node(job_id, node, "node lost")
        elif r < 0.95:
            j.set_job_state(job_id, rng.choice(["running", "done", "failed", "cancelled"]), t)
        else:
            job = j.job(job_id)
            assert job is not None
            j.create_job(job_id, job.spec, [t.spec for t in tasks], submitter="u", created_at=t)  # duplicate submit


def follow(primary: Journal, replica: Journal, rng: random.Random) -> None:
    """Ship changes in random chunks, over a JSON 'wire', with overlaps (duplicates) and gapped sends."""
    while replica.last_seq() < primary.last_seq():
        last = replica.last_seq()
        kind = rng.random()
        if kind < 0.15:
            gapped = primary.changes_since(last + 1, limit=rng.randint(1, 10))
            if gapped:
                before = replica.dump()
                with pytest.raises(JournalGapError):
                    replica.apply(gapped)
                assert replica.last_seq() == last and replica.dump() == before
            continue
        start = max(0, last - rng.randint(0, 6)) if kind < 0.5 else last
        chunk = primary.changes_since(start, limit=rng.randint(1, 25))
        wire = json.loads(json.dumps([c.to_dict() for c in chunk]))
        applied = replica.apply([Change.from_dict(d) for d in wire])
        assert applied == replica.last_seq() - last
        if rng.random() < 0.2:
            assert replica.apply(chunk) == 0  # a retried send changes nothing


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_replica_converges_and_successor_continues(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    primary = Journal.open(tmp_path / "primary.db")
    replica = Journal.open(tmp_path / "replica.db")

    def covered() -> bool:  # every kind of change, and failures leaving each state, went through
        history = primary.changes_since(0, 10_000)
        return ({c.op for c in history} >= {"job", "started", "results", "failure", "requeue", "job_state"}
                and {c.payload["state"] for c in history if c.op == "failure"} == {"pending", "failed", "running"})

    for rounds in range(1, 31):
        with primary.batch():
            random_ops(primary, rng, 40, "a")
        follow(primary, replica, rng)
        assert replica.dump() == primary.dump()
        if rounds >= 10 and covered():
            break
    assert replica.changes_since(0, 10_000) == primary.changes_since(0, 10_000)
    n = primary.last_seq()
    assert n > 80
    history = primary.changes_since(0, 10_000)
    assert {c.op for c in history} >= {"job", "started", "results", "failure", "requeue", "job_state"}
    assert {c.payload["state"] for c in history if c.op == "failure"} == {"pending", "failed", "running"}

    # The primary dies (here: a change it made after the replica's last fetch is never shipped).
    random_ops(primary, rng, 5, "a", t0=500.0)
    lost_tail = primary.changes_since(n)
    primary.close()

    # The replica's journal is reopened as the new primary: epoch + 1, seq goes on.
    replica.close()
    successor = Journal.open(tmp_path / "replica.db")
    assert successor.last_seq() == n
    assert successor.bump_epoch() == 2
    assert successor.last_seq() == n + 1
    with successor.batch():
        random_ops(successor, rng, 60, "b", t0=1000.0)
    new = successor.changes_since(n)
    assert [c.seq for c in new] == list(range(n + 1, successor.last_seq() + 1))
    assert all(c.epoch == 2 for c in new) and new[0].payload == {"op": "epoch", "epoch": 2}

    # A fresh replica of the successor rebuilds the whole history and the same state.
    replica2 = Journal.open(tmp_path / "replica2.db")
    follow(successor, replica2, rng)
    assert replica2.dump() == successor.dump()
    assert replica2.epoch() == 2

    # The deposed primary's history is refused: same seq, other content; or an older epoch.
    if lost_tail:
        with pytest.raises(JournalDivergenceError):
            replica2.apply(lost_tail[:1])
    stale = Change(replica2.last_seq() + 1, 1, {"op": "requeue", "job": "a-0", "task": 0, "reason": "x"})
    with pytest.raises(StaleEpochError):
        replica2.apply([stale])
    assert replica2.dump() == successor.dump()
    successor.close()
    replica2.close()


def test_bump_epoch_can_jump(journal: Journal) -> None:
    assert journal.bump_epoch() == 2
    assert journal.bump_epoch(at_least=7) == 7
    assert journal.bump_epoch(at_least=3) == 8
    assert [c.epoch for c in journal.changes_since(0)] == [2, 7, 8]


def test_a_non_durable_batch_commits_and_leaves_later_commits_durable(tmp_path: Path) -> None:
    j = Journal.open(tmp_path / "j.db")
    j.create_job("job", {"name": "x"}, [{"argv": ["true"]}] * 2, submitter="me", created_at=0.0)
    with j.batch(durable=False):
        j.mark_running("job", 0, "n1", 1.0)
    with j.batch():
        assert j._conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL again for a durable one
    j.close()
    again = Journal.open(tmp_path / "j.db")
    assert again.task("job", 0).state == "running"
    again.close()


SYNC_PHASES = textwrap.dedent("""
    import os, sys
    from bonjourgrid.journal import Journal, ResultRecord
    j = Journal.open(sys.argv[1])
    j.create_job("job", {"name": "x"}, [{"argv": ["true"]}] * 3, submitter="me", created_at=0.0)
    j.mark_running_many("job", [0, 1, 2], "n1", 1.0)
    r = ResultRecord(exit_code=0, started_at=1.0, finished_at=2.0, node_id="n1", attempt=1, stdout=b"o", stderr=b"")
    os.access("/phase:results-not-durable", os.F_OK)
    with j.batch(durable=False):
        j.record_results("job", [(0, r), (1, r)])
    print(j.unsynced, flush=True)
    os.access("/phase:sync", os.F_OK)
    j.sync()
    print(j.unsynced, flush=True)
    os.access("/phase:sync-again", os.F_OK)
    j.sync()
    os.access("/phase:durable-result", os.F_OK)
    j.record_result("job", 2, r)
    os.access("/phase:end", os.F_OK)
    j.close()
""")


@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace (scripts/setup.sh installs it)")
def test_results_committed_without_fsync_reach_the_disk_at_the_next_sync(tmp_path: Path) -> None:
    """What the native backend relies on: its results are acknowledged before any fsync, and one
    sync() (before a worker that keeps them is released) makes them all durable."""
    trace = tmp_path / "trace"
    out = subprocess.run(["strace", "-f", "-qq", "-e", "trace=access,fsync,fdatasync", "-o", str(trace),
                          sys.executable, "-c", SYNC_PHASES, str(tmp_path / "j.db")],
                         capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "False"]
    syncs: dict[str, int] = {}
    phase = "setup"
    for line in trace.read_text().splitlines():
        if '"/phase:' in line:
            phase = line.split('"/phase:')[1].split('"')[0]
        elif "fsync(" in line or "fdatasync(" in line:
            syncs[phase] = syncs.get(phase, 0) + 1
    assert "results-not-durable" not in syncs  # acknowledged without waiting for the disk
    assert syncs.get("sync", 0) >= 1  # ... and synced, the WAL as a whole, by sync()
    assert "sync-again" not in syncs  # nothing new: nothing written, nothing synced
    assert syncs.get("durable-result", 0) >= 1  # other writes stay synced at commit
    again = Journal.open(tmp_path / "j.db")
    assert [i for i, _ in again.results("job")] == [0, 1, 2]
    again.close()


def test_changes_since_keeps_a_batch_within_a_byte_budget_but_always_sends_the_first(tmp_path):
    j = Journal.open(tmp_path / "j.db")
    j.create_job("big", {"name": "big"}, [{"argv": ["true", "x" * 1000]} for _ in range(50)], submitter="n",
                 created_at=0.0)
    for i in range(5):
        j.mark_running("big", i, "n", 1.0)
    everything = j.changes_since(0, 100)
    assert len(everything) == 6
    assert [c.seq for c in j.changes_since(0, 100, max_bytes=100)] == [1]  # 50 KB: alone, but sent
    assert [c.seq for c in j.changes_since(1, 100, max_bytes=1 << 20)] == [2, 3, 4, 5, 6]
    small = len(json.dumps(everything[1].payload))
    assert len(j.changes_since(1, 100, max_bytes=2 * small + 10)) == 2


def test_warm_up_leaves_the_job_as_it_was(tmp_path: Path) -> None:
    j = Journal.open(tmp_path / "j.db")
    j.create_job("job", {"name": "x"}, [{"argv": ["true"]}] * 3, submitter="me", created_at=0.0)
    j.mark_running("job", 0, "n1", 1.0)
    before = (j.last_seq(), [(t.state, t.attempts, t.node_id) for t in j.tasks("job")], j.unsynced)
    j.warm_up("job")
    assert (j.last_seq(), [(t.state, t.attempts, t.node_id) for t in j.tasks("job")], j.unsynced) == before
    assert j.changes_since(before[0]) == [] and list(j.results("job")) == []
    with j.batch(durable=False):  # and the real first task runs as it would have
        assert j.mark_running_many("job", [1], "n1", 2.0) == ([(1, 1)], {})
    r = ResultRecord(exit_code=0, started_at=2.0, finished_at=3.0, node_id="n1", attempt=1)
    assert j.record_results("job", [(1, r)]) == [True]
    assert [t.state for t in j.tasks("job")] == ["running", "done", "pending"]
    j.close()
    again = Journal.open(tmp_path / "j.db")
    again.warm_up("nothing")  # an unknown job, or one with no pending task: nothing to do
    assert [i for i, _ in again.results("job")] == [1]
    again.close()
