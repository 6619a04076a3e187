"""Replication and result recording under message loss and a coordinator crash (real journals, seeded).

A coordinator records results in its journal and streams the change log to a replica over a
channel that drops, duplicates and re-sends batches; workers keep every result they produced and
resend them all to whoever coordinates after a crash. Invariants:

* no acknowledged result is ever lost: every result the coordinator acknowledged is in the final
  journal, with the value the worker computed;
* no result is recorded twice: one result row and one `result` change per task;
* the job completes: every task ends with its result.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from bonjourgrid.journal import Change, Journal, ResultRecord
from bonjourgrid.replication import ReplicaStore

JOB = "job"


def result(index: int, node: str, attempt: int) -> ResultRecord:
    return ResultRecord(exit_code=0, started_at=0.0, finished_at=1.0, node_id=node, attempt=attempt,
                        stdout=f"value {index * index} from {node}, attempt {attempt}".encode())


def ship(rng: random.Random, primary: Journal, replica: ReplicaStore, acked_seq: int, drop: float) -> int:
    """One replication round: a batch from the replica's last ack, maybe lost, maybe sent twice."""
    changes = primary.changes_since(acked_seq, rng.randint(1, 20))
    if not changes or rng.random() < drop:
        return acked_seq
    body = {"changes": [c.to_dict() for c in changes], "inputs": []}
    seq = replica.apply(body, None)
    if rng.random() < 0.2:
        seq = replica.apply(body, None)  # duplicated batch: applied once
    return seq if rng.random() > drop else acked_seq  # the ack itself may be lost


@pytest.mark.parametrize("seed", range(40))
def test_no_acknowledged_result_lost_none_recorded_twice(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    n, workers = rng.randint(10, 40), ["w1", "w2", "w3"]
    drop = rng.choice([0.0, 0.2, 0.5])
    primary = Journal.open(tmp_path / "c" / "journal.db")
    primary.create_job(JOB, {"name": "sim"}, [{"argv": ["t", str(i)]} for i in range(n)], submitter="c",
                       created_at=0.0)
    replica = ReplicaStore(tmp_path / "r", key=None, ce=JOB)  # type: ignore[arg-type]
    held: dict[str, dict[int, ResultRecord]] = {w: {} for w in workers}
    acked: dict[int, ResultRecord] = {}
    rep_seq, crash_at, step = 0, rng.randint(5, 3 * n), 0
    coordinator = primary
    crashed = False
    while True:
        step += 1
        pending = coordinator.pending_tasks(JOB, 100)
        if not pending and coordinator.job(JOB).settled:
            break
        if not crashed and step == crash_at:
            # The coordinator dies: the replica's journal becomes the primary, workers resend all they hold.
            crashed = True
            primary.close()
            replica.close()
            coordinator = Journal.open(tmp_path / "r" / "journal.db")
            coordinator.bump_epoch()
            for t in coordinator.tasks(JOB, "running"):
                coordinator.requeue(JOB, t.index, "its worker may be gone")
            for w in workers:
                for index, rec in held[w].items():
                    coordinator.record_result(JOB, index, rec)
            continue
        if pending and rng.random() < 0.7:
            t = rng.choice(pending)
            w = rng.choice(workers)
            attempt = coordinator.mark_running(JOB, t.index, w, float(step))
            rec = result(t.index, w, attempt)
            held[w][t.index] = rec  # the worker keeps it until the CE releases it
            if rng.random() > drop:  # the result message reaches the coordinator
                coordinator.record_result(JOB, t.index, rec)
                if rng.random() > drop:  # and its acknowledgement reaches the worker
                    acked[t.index] = rec
        elif not crashed:
            rep_seq = ship(rng, primary, replica, rep_seq, drop)
        else:  # after the crash: resends of unacknowledged results, and running tasks requeued
            for t in coordinator.tasks(JOB, "running"):
                coordinator.requeue(JOB, t.index, "lost")
    final = {i: r for i, r in coordinator.results(JOB)}
    assert sorted(final) == list(range(n))
    for index, rec in acked.items():
        assert final[index].stdout == rec.stdout
    recorded = [i for c in coordinator.changes_since(0, 1_000_000) for i, _ in c.results()]
    assert sorted(recorded) == list(range(n))
    assert all(isinstance(c, Change) for c in coordinator.changes_since(0, 5))
    coordinator.close()
    replica.close()
