"""The coordinator's durable job journal: SQLite in WAL mode, replicable by log shipping.

Why it looks the way it does:

* **Durability.** The database runs with ``journal_mode=WAL``, and every durable commit with
  ``synchronous=FULL`` (the connection sits at NORMAL between them, so that the hot paths'
  commits without fsync need no switch). In WAL
  mode, FULL makes SQLite fsync the WAL file at *every* commit before ``COMMIT`` returns, so
  once a mutating method (or the outermost ``with journal.batch():``) has returned, the change
  survives a crash of the process *and* of the operating system or a power cut, provided the
  disk honours fsync. (WAL + NORMAL would only survive a process crash: the last commits
  could be lost on power failure.) ``fullfsync`` is switched on too, which only matters on
  macOS. A result "counts" once :meth:`Journal.record_result` has returned True: only then
  may the coordinator acknowledge it to the worker. ``batch(durable=False)`` commits without
  the fsync, for what lives on elsewhere until :meth:`Journal.sync` (results their workers
  keep until released: see ``CoordinatorCE.accept_results``); such commits survive a crash of
  the process, not a power cut, until then.
* **Group commit.** Each mutation is its own transaction (one fsync). ``with journal.batch():``
  wraps many mutations in one transaction and one fsync; nothing in it is durable before the
  ``with`` block exits. Inside a batch each mutation is still atomic on its own (a savepoint),
  so a caught exception does not leave half an operation behind.
* **Replication.** Every state change is written, in the same transaction, as a *logical*
  change (``{"op": "result", ...}``, never SQL) to the ``changes`` table with a gapless ``seq``.
  The primary and a replica run the *same* code to turn a change into table rows
  (:meth:`Journal._apply_payload`), so a replica that applied every change has the same state
  by construction. A replica keeps the changes it applied under the same ``seq``; when it is
  opened as primary by a successor coordinator, new changes continue that ``seq``.
* **Epoch fencing.** The journal stores the CE epoch and every change carries the epoch it was
  made in. A replica refuses changes from an epoch older than its own, and refuses a change
  whose ``seq`` it already holds with different content (a deposed coordinator's history).
* **Results inline.** stdout/stderr are stored inline as BLOBs (the caller caps their size):
  a result then becomes durable and replicated in one transaction, with no second file to
  fsync or ship. Large outputs belong in files, listed in the outputs manifest.
* **One primary per file.** ``open`` takes an exclusive ``flock`` on ``<db>.lock`` so that two
  coordinators (or a stale process) never write the same journal.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, TypeVar

from .sandbox import OutputFile  # one manifest entry type, from the sandbox to the journal

SCHEMA_VERSION = 1

TASK_STATES = ("pending", "running", "done", "failed")
JOB_STATES = ("running", "done", "failed", "cancelled")
FINISHED_JOB_STATES = ("done", "failed", "cancelled")

# ---------------------------------------------------------------- errors ----


class _RolledBack(Exception):
    """Raised inside a batch to roll it back on purpose (`Journal.warm_up`)."""


class JournalError(Exception):
    """Base class of every error raised by the journal."""


class SchemaVersionError(JournalError):
    """The file was written by a newer BonjourGrid (or is not a journal): refuse rather than corrupt it."""


class JournalLockedError(JournalError):
    """Another Journal (this process or another) has the file open."""


class UnknownJobError(JournalError, LookupError):
    pass


class UnknownTaskError(JournalError, LookupError):
    pass


class JobConflictError(JournalError):
    """``create_job`` with an existing job id but a different spec or task list."""


class InvalidTransitionError(JournalError):
    """The requested task transition is not allowed from the task's current state."""


class JournalWriteError(JournalError):
    """SQLite could not write (a full disk, an I/O error): nothing of the batch was kept; it may work later."""


class JournalGapError(JournalError):
    """A replica was given a change whose seq is not ``last_seq() + 1``: some changes are missing."""


class JournalDivergenceError(JournalError):
    """A replica holds a different change under the same seq: the histories forked; resync from scratch."""


class StaleEpochError(JournalDivergenceError):
    """A change from an epoch older than the replica's: it comes from a deposed coordinator."""


# ------------------------------------------------------------ data types ----


@dataclass(frozen=True)
class ResultRecord:
    """What one execution attempt of a task produced (a success or a failure alike).

    stdout/stderr are bytes, already capped by the caller; they are stored inline.
    """

    exit_code: int
    started_at: float
    finished_at: float
    node_id: str
    attempt: int
    stdout: bytes = b""
    stderr: bytes = b""
    outputs: tuple[OutputFile, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form (bytes as base64), used in change payloads and usable on the wire."""
        return {
            "exit_code": self.exit_code,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "node_id": self.node_id,
            "attempt": self.attempt,
            "stdout": base64.b64encode(self.stdout).decode("ascii"),
            "stderr": base64.b64encode(self.stderr).decode("ascii"),
            "outputs": [o.to_dict() for o in self.outputs],
            "extra": self.extra,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ResultRecord:
        return cls(
            exit_code=int(d["exit_code"]),
            started_at=float(d["started_at"]),
            finished_at=float(d["finished_at"]),
            node_id=str(d["node_id"]),
            attempt=int(d["attempt"]),
            stdout=base64.b64decode(d.get("stdout", "")),
            stderr=base64.b64decode(d.get("stderr", "")),
            outputs=tuple(OutputFile.from_dict(o) for o in d.get("outputs", ())),
            extra=dict(d.get("extra") or {}),
        )


@dataclass(frozen=True)
class TaskRow:
    """A task as the scheduler sees it.

    ``attempts`` counts starts (``mark_running``); ``failures`` counts reported failed
    executions. A requeue (worker lost, owner took the desktop back) keeps ``attempts`` and
    does not add a failure. ``tried_nodes`` lists every node the task was started on, oldest
    first, so the scheduler can prefer another node for a retry.
    """

    job_id: str
    index: int
    spec: dict[str, Any]
    state: str
    node_id: str | None
    attempts: int
    failures: int
    started_at: float | None
    tried_nodes: tuple[str, ...]


@dataclass(frozen=True)
class JobRow:
    job_id: str
    spec: dict[str, Any]
    submitter: str
    state: str
    created_at: float
    finished_at: float | None
    n_tasks: int
    counts: dict[str, int]

    @property
    def settled(self) -> bool:
        """True when no task is pending or running: the caller may then finish the job."""
        return self.counts["pending"] == 0 and self.counts["running"] == 0


@dataclass(frozen=True)
class Change:
    """One entry of the replication stream. ``payload`` is logical (an ``op`` and its data)."""

    seq: int
    epoch: int
    payload: dict[str, Any]

    @property
    def op(self) -> str:
        return str(self.payload["op"])

    def results(self) -> list[tuple[int, dict[str, Any]]]:
        """(task index, result as a dict) for each successful result this change records."""
        p = self.payload
        if p["op"] == "results":
            return [(int(i), r) for i, r in p["results"]]
        return [(int(p["task"]), p["result"])] if p["op"] == "result" else []

    def to_dict(self) -> dict[str, Any]:
        return {"seq": self.seq, "epoch": self.epoch, "payload": self.payload}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Change:
        return cls(seq=int(d["seq"]), epoch=int(d["epoch"]), payload=dict(d["payload"]))


class FailureOutcome(StrEnum):
    """What ``record_failure`` did with a failed attempt."""

    REQUEUED = "requeued"  # failures left: the task is pending again
    FAILED = "failed"  # out of failures: the task is failed for good
    COUNTED = "counted"  # a stale attempt (another one is running): counted, state unchanged
    IGNORED = "ignored"  # duplicate report, or the task already done/failed: nothing changed


# ---------------------------------------------------------------- schema ----

_SCHEMA_V1 = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE jobs (
    job_id      TEXT PRIMARY KEY,
    spec        TEXT NOT NULL,
    submitter   TEXT NOT NULL,
    state       TEXT NOT NULL,
    created_at  REAL NOT NULL,
    finished_at REAL,
    n_tasks     INTEGER NOT NULL
);
CREATE TABLE tasks (
    job_id      TEXT NOT NULL REFERENCES jobs(job_id),
    idx         INTEGER NOT NULL,
    spec        TEXT NOT NULL,
    state       TEXT NOT NULL,
    node_id     TEXT,
    attempts    INTEGER NOT NULL DEFAULT 0,
    failures    INTEGER NOT NULL DEFAULT 0,
    started_at  REAL,
    tried_nodes TEXT NOT NULL DEFAULT '[]',
    PRIMARY KEY (job_id, idx)
) WITHOUT ROWID;
CREATE INDEX tasks_by_state ON tasks (job_id, state, idx);
CREATE INDEX tasks_by_node ON tasks (job_id, node_id) WHERE state = 'running';
CREATE TABLE results (
    job_id      TEXT NOT NULL,
    idx         INTEGER NOT NULL,
    attempt     INTEGER NOT NULL,
    exit_code   INTEGER NOT NULL,
    started_at  REAL NOT NULL,
    finished_at REAL NOT NULL,
    node_id     TEXT NOT NULL,
    stdout      BLOB NOT NULL,
    stderr      BLOB NOT NULL,
    outputs     TEXT NOT NULL,
    extra       TEXT NOT NULL,
    PRIMARY KEY (job_id, idx),
    FOREIGN KEY (job_id, idx) REFERENCES tasks(job_id, idx)
);
CREATE TABLE failures (
    job_id      TEXT NOT NULL,
    idx         INTEGER NOT NULL,
    attempt     INTEGER NOT NULL,
    exit_code   INTEGER NOT NULL,
    started_at  REAL NOT NULL,
    finished_at REAL NOT NULL,
    node_id     TEXT NOT NULL,
    stdout      BLOB NOT NULL,
    stderr      BLOB NOT NULL,
    outputs     TEXT NOT NULL,
    extra       TEXT NOT NULL,
    PRIMARY KEY (job_id, idx, attempt),
    FOREIGN KEY (job_id, idx) REFERENCES tasks(job_id, idx)
);
CREATE TABLE changes (
    seq     INTEGER PRIMARY KEY,
    epoch   INTEGER NOT NULL,
    payload TEXT NOT NULL
);
INSERT INTO meta (key, value) VALUES ('epoch', '1');
"""

_RESULT_COLS = "attempt, exit_code, started_at, finished_at, node_id, stdout, stderr, outputs, extra"
_IN_CHUNK = 500  # indices per `IN (...)` query: SQLite caps bound parameters (999 before 3.32)
_TASK_COLS = "job_id, idx, spec, state, node_id, attempts, failures, started_at, tried_nodes"
_T = TypeVar("_T")
_B = TypeVar("_B")


def _canon(obj: Any) -> str:
    """Canonical JSON, so equal content gives equal text (spec comparison, divergence checks)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def _result_row(r: ResultRecord) -> tuple[Any, ...]:
    return (
        r.attempt,
        r.exit_code,
        r.started_at,
        r.finished_at,
        r.node_id,
        bytes(r.stdout),
        bytes(r.stderr),
        _canon([o.to_dict() for o in r.outputs]),
        _canon(r.extra),
    )


def _loads(text: str) -> Any:
    """json.loads, without its cost for the empty list and object most rows hold (results and
    task lists read a few thousand rows at a time)."""
    if text == "[]":
        return []
    if text == "{}":
        return {}
    return json.loads(text)


def _result_from_row(row: tuple[Any, ...]) -> ResultRecord:
    attempt, exit_code, started_at, finished_at, node_id, stdout, stderr, outputs, extra = row
    return ResultRecord(
        exit_code=exit_code,
        started_at=started_at,
        finished_at=finished_at,
        node_id=node_id,
        attempt=attempt,
        stdout=bytes(stdout),
        stderr=bytes(stderr),
        outputs=tuple(OutputFile.from_dict(o) for o in _loads(outputs)),
        extra=_loads(extra),
    )


def _task_from_row(row: tuple[Any, ...]) -> TaskRow:
    job_id, idx, spec, state, node_id, attempts, failures, started_at, tried = row
    return TaskRow(
        job_id=job_id,
        index=idx,
        spec=json.loads(spec),
        state=state,
        node_id=node_id,
        attempts=attempts,
        failures=failures,
        started_at=started_at,
        tried_nodes=tuple(_loads(tried)),
    )


# --------------------------------------------------------------- journal ----


class Journal:
    """The durable state of one coordinator's CE; see the module docstring for the guarantees.

    Methods block on fsync (a few ms each outside a batch): call them from a worker thread
    (``asyncio.to_thread``) in async code. A lock makes one Journal safe to share between threads.
    """

    def __init__(self, conn: sqlite3.Connection, path: Path, lock_fd: int) -> None:
        self._conn = conn
        self._path = path
        self._lock_fd = lock_fd
        self._mutex = threading.RLock()
        self._depth = 0  # nesting of batch()/mutations; 0 means no open transaction
        # Cached last seq and epoch (None = unknown): safe because the flock makes this the only writer;
        # dropped on every rollback.
        self._seq: int | None = None
        self._ep: int | None = None
        # Seq of the newest committed change, for readers on an event loop: a plain attribute, so
        # they never wait for the lock while a batch holds it through its fsync.
        self.committed_seq = self.last_seq()
        # Commits of `batch(durable=False)` not synced to disk since: `sync()` makes them durable.
        self.unsynced = False

    # ------------------------------------------------------------ lifecycle

    @classmethod
    def open(cls, path: Path | str) -> Journal:
        """Open (creating if needed) the journal at ``path``; refuses a schema newer than this code."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        lock_fd = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(lock_fd)
            raise JournalLockedError(f"journal {path} is already open elsewhere") from None
        conn: sqlite3.Connection | None = None
        try:
            conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise JournalError(f"cannot put {path} in WAL mode (got {mode!r}); is the filesystem local?")
            for pragma in ("synchronous=FULL", "fullfsync=ON", "checkpoint_fullfsync=ON", "foreign_keys=ON"):
                conn.execute(f"PRAGMA {pragma}")
            conn.execute("PRAGMA busy_timeout=5000")
            cls._migrate(conn, path)
            conn.execute("PRAGMA synchronous=NORMAL")  # `batch` sets FULL for the commits that must sync
        except BaseException as e:
            if conn is not None:
                conn.close()
            os.close(lock_fd)
            if isinstance(e, sqlite3.OperationalError):  # a full disk, a directory we may not write
                raise JournalWriteError(f"cannot open the journal {path}: {e}") from e
            if isinstance(e, sqlite3.Error):  # a file that is not a database
                raise JournalError(f"cannot open the journal {path}: {e}") from e
            raise
        return cls(conn, path, lock_fd)

    @staticmethod
    def _migrate(conn: sqlite3.Connection, path: Path) -> None:
        conn.execute("BEGIN IMMEDIATE")
        try:
            tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            if "schema_version" not in tables:
                if tables:
                    raise SchemaVersionError(f"{path} is an SQLite file but not a BonjourGrid journal")
                conn.execute("CREATE TABLE schema_version (version INTEGER PRIMARY KEY, applied_at REAL NOT NULL)")
            version = conn.execute("SELECT COALESCE(MAX(version), 0) FROM schema_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise SchemaVersionError(
                    f"{path} has journal schema v{version}, this BonjourGrid only knows up to v{SCHEMA_VERSION}:"
                    " upgrade BonjourGrid (the file was left untouched)"
                )
            if version < 1:
                for stmt in _SCHEMA_V1.split(";"):
                    if stmt.strip():
                        conn.execute(stmt)
                conn.execute("INSERT INTO schema_version VALUES (1, ?)", (time.time(),))
            # Future migrations: `if version < 2: ...` here, each recorded in schema_version.
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    def close(self) -> None:
        """Close the database and release the file lock (idempotent)."""
        with self._mutex:
            if self._lock_fd < 0:
                return
            if self._depth:
                raise JournalError("close() inside a batch")
            self._conn.close()
            os.close(self._lock_fd)
            self._lock_fd = -1

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def path(self) -> Path:
        return self._path

    # ---------------------------------------------------------- transactions

    @contextlib.contextmanager
    def batch(self, durable: bool = True) -> Iterator[None]:
        """Group commit: everything inside is one transaction and one fsync (durable at exit).

        Nested batches join the outer one. An exception escaping the block rolls it all back.
        `durable=False` skips the fsync: for changes whose loss in a power cut costs nothing (a
        task marked running is found again from the workers) or that live on elsewhere until
        `sync()` (results their workers keep). They survive a crash of this process all the same,
        and become durable with the next durable commit, since the WAL is synced as a whole, in
        order.
        """
        with self._mutex:
            if self._depth == 0:
                if durable:  # the connection's default is NORMAL: the hot paths commit without fsync
                    self._conn.execute("PRAGMA synchronous=FULL")
                self._conn.execute("BEGIN IMMEDIATE")
                written_before = self._conn.total_changes
            self._depth += 1
            try:
                yield
            except BaseException as e:
                self._depth -= 1
                if self._depth == 0:
                    self._rollback()
                    if durable:
                        self._conn.execute("PRAGMA synchronous=NORMAL")
                    if isinstance(e, sqlite3.OperationalError):
                        raise self._write_error(e) from e
                raise
            self._depth -= 1
            if self._depth == 0:
                try:
                    self._conn.execute("COMMIT")
                except BaseException as e:  # e.g. disk full or I/O error: nothing of the batch is kept
                    self._rollback()
                    if isinstance(e, sqlite3.OperationalError):
                        raise self._write_error(e) from e
                    raise
                finally:
                    if durable:
                        self._conn.execute("PRAGMA synchronous=NORMAL")
                if self._conn.total_changes != written_before:  # an empty commit syncs nothing
                    self.unsynced = not durable
                self.committed_seq = self._last_seq()

    def run_if_free(self, fn: Callable[[], _T], busy: _B) -> _T | _B:
        """`fn()` now if no other thread holds the journal, else `busy` without running it: for an
        event loop, which must not wait for another thread's fsync."""
        if not self._mutex.acquire(blocking=False):
            return busy
        try:
            return fn()
        finally:
            self._mutex.release()

    def warm_up(self, job_id: str) -> None:
        """Compile the statements of a task's start and result, in a transaction rolled back.

        sqlite3 compiles each statement once per connection, and a CE opens a new journal: its
        first task and first result would each wait for that, a tenth of a millisecond of a 3 ms
        round trip. Nothing of the job changes; a job with no pending task is left alone.
        """
        with self._mutex:
            row = self._conn.execute("SELECT idx FROM tasks WHERE job_id=? AND state='pending' LIMIT 1",
                                     (job_id,)).fetchone()
            if row is None:
                return
            index = row[0]
            with contextlib.suppress(_RolledBack), self.batch(durable=False):
                self.mark_running_many(job_id, [index], "warm-up", 0.0)
                self.record_results(job_id, [(index, ResultRecord(exit_code=0, started_at=0.0, finished_at=0.0,
                                                                  node_id="warm-up", attempt=1))])
                raise _RolledBack

    def sync(self) -> None:
        """Make every commit so far survive a power cut, after `batch(durable=False)` ones.

        One small durable write does it: SQLite syncs the WAL as a whole, in order. Nothing is
        written when nothing waits to be synced.
        """
        with self._mutex:
            if self._depth:
                raise JournalError("sync() inside a batch")
            if not self.unsynced:
                return
            with self._atomic():
                self._conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('synced_at', ?)",
                                   (repr(time.time()),))

    def _write_error(self, e: sqlite3.OperationalError) -> JournalWriteError:
        return JournalWriteError(f"cannot write the journal {self._path}: {e}")

    def _rollback(self) -> None:
        self._seq = self._ep = None
        if self._conn.in_transaction:
            self._conn.execute("ROLLBACK")

    @contextlib.contextmanager
    def _atomic(self) -> Iterator[None]:
        """One mutation: its own transaction, or a savepoint inside a running batch."""
        with self._mutex:
            if self._lock_fd < 0:
                raise JournalError("journal is closed")
            if self._depth == 0:
                with self.batch():
                    yield
                return
            # One fixed name keeps the statements in sqlite3's cache; savepoints of a name nest.
            self._conn.execute("SAVEPOINT op")
            try:
                yield
            except BaseException:
                self._seq = self._ep = None
                self._conn.execute("ROLLBACK TO op")
                self._conn.execute("RELEASE op")
                raise
            self._conn.execute("RELEASE op")

    def _emit(self, payload: dict[str, Any]) -> None:
        """Apply a logical change to the tables and append it to the change log (inside _atomic)."""
        text = _canon(payload)
        # Apply the decoded text, exactly what a replica will see: both store identical values.
        self._apply_payload(json.loads(text))
        seq = self._last_seq() + 1
        self._conn.execute("INSERT INTO changes (seq, epoch, payload) VALUES (?, ?, ?)", (seq, self._epoch(), text))
        self._seq = seq

    # ------------------------------------------------------------------ jobs

    def create_job(
        self,
        job_id: str,
        spec: dict[str, Any],
        task_specs: list[dict[str, Any]],
        *,
        submitter: str,
        created_at: float,
    ) -> bool:
        """Create a job with ``len(task_specs)`` pending tasks.

        Returns False (and changes nothing) if the same job already exists, so a resubmission
        after a lost acknowledgement is harmless; raises JobConflictError if it differs.
        """
        with self._atomic():
            row = self._conn.execute("SELECT spec FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
            if row is not None:
                cur = self._conn.execute("SELECT spec FROM tasks WHERE job_id=? ORDER BY idx", (job_id,))
                old_tasks = [r[0] for r in cur]
                if row[0] == _canon(spec) and old_tasks == [_canon(t) for t in task_specs]:
                    return False
                raise JobConflictError(f"job {job_id} already exists with a different spec or task list")
            self._emit(
                {
                    "op": "job",
                    "job": job_id,
                    "spec": spec,
                    "tasks": list(task_specs),
                    "submitter": submitter,
                    "created_at": created_at,
                }
            )
            return True

    def job(self, job_id: str) -> JobRow | None:
        with self._mutex:
            row = self._conn.execute(
                "SELECT job_id, spec, submitter, state, created_at, finished_at, n_tasks FROM jobs WHERE job_id = ?",
                (job_id,),
            ).fetchone()
            return None if row is None else self._job_from_row(row)

    def jobs(self) -> list[JobRow]:
        """All jobs, oldest first."""
        with self._mutex:
            rows = self._conn.execute(
                "SELECT job_id, spec, submitter, state, created_at, finished_at, n_tasks FROM jobs"
                " ORDER BY created_at, job_id"
            ).fetchall()
            return [self._job_from_row(r) for r in rows]

    def _job_from_row(self, row: tuple[Any, ...]) -> JobRow:
        job_id, spec, submitter, state, created_at, finished_at, n_tasks = row
        counts = dict.fromkeys(TASK_STATES, 0)
        for st, n in self._conn.execute("SELECT state, COUNT(*) FROM tasks WHERE job_id=? GROUP BY state", (job_id,)):
            counts[st] = n
        return JobRow(job_id, json.loads(spec), submitter, state, created_at, finished_at, n_tasks, counts)

    def set_job_state(self, job_id: str, state: str, at: float) -> None:
        """Set the job's state; a finished state (done/failed/cancelled) records ``at`` as finished_at."""
        if state not in JOB_STATES:
            raise ValueError(f"unknown job state {state!r}; expected one of {JOB_STATES}")
        with self._atomic():
            row = self._conn.execute("SELECT state FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
            if row is None:
                raise UnknownJobError(job_id)
            if row[0] == state:
                return
            self._emit({"op": "job_state", "job": job_id, "state": state, "at": at})

    # ----------------------------------------------------------------- tasks

    def task(self, job_id: str, index: int) -> TaskRow:
        with self._mutex:
            row = self._conn.execute(
                f"SELECT {_TASK_COLS} FROM tasks WHERE job_id = ? AND idx = ?", (job_id, index)
            ).fetchone()
            if row is None:
                raise UnknownTaskError(f"{job_id}[{index}]")
            return _task_from_row(row)

    def tasks(self, job_id: str, state: str | None = None) -> list[TaskRow]:
        """Tasks of a job by index, optionally only those in ``state``."""
        with self._mutex:
            if state is None:
                cur = self._conn.execute(f"SELECT {_TASK_COLS} FROM tasks WHERE job_id=? ORDER BY idx", (job_id,))
            else:
                cur = self._conn.execute(
                    f"SELECT {_TASK_COLS} FROM tasks WHERE job_id=? AND state=? ORDER BY idx", (job_id, state)
                )
            return [_task_from_row(r) for r in cur]

    def pending_tasks(self, job_id: str, limit: int) -> list[TaskRow]:
        """Up to ``limit`` pending tasks, lowest index first."""
        with self._mutex:
            cur = self._conn.execute(
                f"SELECT {_TASK_COLS} FROM tasks WHERE job_id=? AND state='pending' ORDER BY idx LIMIT ?",
                (job_id, limit),
            )
            return [_task_from_row(r) for r in cur]

    def _task_state(self, job_id: str, index: int) -> tuple[str, int, int, str | None]:
        row = self._conn.execute(
            "SELECT state, attempts, failures, node_id FROM tasks WHERE job_id = ? AND idx = ?", (job_id, index)
        ).fetchone()
        if row is None:
            raise UnknownTaskError(f"{job_id}[{index}]")
        return row

    def _by_index(self, job_id: str, cols: str, indices: list[int]) -> Iterator[tuple[Any, ...]]:
        """Rows (idx, cols...) of the job's tasks in `indices`: one query per few hundred, not one per task."""
        wanted = list(dict.fromkeys(indices))
        for k in range(0, len(wanted), _IN_CHUNK):
            chunk = wanted[k:k + _IN_CHUNK]
            marks = ",".join("?" * len(chunk))
            yield from self._conn.execute(f"SELECT idx, {cols} FROM tasks WHERE job_id=? AND idx IN ({marks})",
                                          (job_id, *chunk))

    def _states(self, job_id: str, indices: list[int]) -> dict[int, tuple[str, int]]:
        """(state, attempts) of each of `indices`; UnknownTaskError if one is missing."""
        out = {idx: (state, attempts) for idx, state, attempts in self._by_index(job_id, "state, attempts", indices)}
        missing = [i for i in indices if i not in out]
        if missing:
            raise UnknownTaskError(f"{job_id}[{missing[0]}]")
        return out

    def mark_running_many(
        self, job_id: str, indices: list[int], node_id: str, at: float
    ) -> tuple[list[tuple[int, int]], dict[int, str]]:
        """pending -> running on ``node_id`` for each of ``indices``, as one change.

        Returns the (index, attempt) pairs started (attempts are 1-based) and, for the tasks
        that were not pending, their state: those are left as they were.
        """
        with self._atomic():
            states = self._states(job_id, indices)
            started, refused = [], {}
            for i in dict.fromkeys(indices):
                state, attempts = states[i]
                if state == "pending":
                    started.append((i, attempts + 1))
                else:
                    refused[i] = state
            if started:
                self._emit({"op": "started", "job": job_id, "node": node_id, "at": at, "tasks": started})
            return started, refused

    def mark_running(self, job_id: str, index: int, node_id: str, at: float) -> int:
        """pending -> running on ``node_id``; returns the new attempt number (1-based)."""
        started, refused = self.mark_running_many(job_id, [index], node_id, at)
        if refused:
            raise InvalidTransitionError(f"{job_id}[{index}] is {refused[index]}, cannot start it")
        return started[0][1]

    def requeue(self, job_id: str, index: int, reason: str, *, attempt: int | None = None) -> bool:
        """running -> pending, keeping the attempt count; no-op (False) if the task is not running.

        With ``attempt``, only that attempt is requeued: a late timeout for attempt 2 then does not
        disturb attempt 3.
        """
        with self._atomic():
            state, attempts, _, _ = self._task_state(job_id, index)
            if state != "running" or (attempt is not None and attempt != attempts):
                return False
            self._emit({"op": "requeue", "job": job_id, "task": index, "reason": reason})
            return True

    def requeue_node(self, job_id: str, node_id: str, reason: str) -> list[int]:
        """Requeue every task of the job running on ``node_id`` (the node was lost); returns their indices."""
        with self._atomic():
            idxs = [
                r[0]
                for r in self._conn.execute(
                    "SELECT idx FROM tasks WHERE job_id=? AND state='running' AND node_id=? ORDER BY idx",
                    (job_id, node_id),
                )
            ]
            for i in idxs:
                self._emit({"op": "requeue", "job": job_id, "task": i, "reason": reason})
            return idxs

    # --------------------------------------------------------------- results

    def record_results(self, job_id: str, results: list[tuple[int, ResultRecord]]) -> list[bool]:
        """Record successful results, each task's exactly once, as one change; the tasks become done.

        Returns, per entry, True when this call stored it (durable on return outside a batch):
        only then acknowledge it. An entry for a task already done or failed (or done by an
        earlier entry of the same call), whichever attempt it comes from, is not stored: False.
        A success from any attempt of a task that is pending or running is accepted (execution
        is at-least-once). What counts as success (e.g. exit code 0) is the caller's decision.
        """
        with self._atomic():
            states = self._states(job_id, [i for i, _ in results])
            stored, taken = [], set()
            for i, _ in results:
                fresh = states[i][0] not in ("done", "failed") and i not in taken
                taken.add(i)
                stored.append(fresh)
            todo = [[i, r.to_dict()] for (i, r), fresh in zip(results, stored, strict=True) if fresh]
            if todo:
                self._emit({"op": "results", "job": job_id, "results": todo})
            return stored

    def record_result(self, job_id: str, index: int, result: ResultRecord) -> bool:
        """:meth:`record_results` for one task."""
        return self.record_results(job_id, [(index, result)])[0]

    def record_failure(self, job_id: str, index: int, result: ResultRecord, *, max_failures: int) -> FailureOutcome:
        """Account a failed attempt: requeue the task, or fail it for good after ``max_failures`` failures.

        Each (task, attempt) failure counts once, so a worker resending its report is harmless.
        The failure (with its stderr) is kept; ``failures()`` lists them and, for a failed task,
        the last one explains why. A failure of an older attempt while a newer one runs is
        counted but does not disturb the running attempt. Requeues for lost workers do not count.
        """
        if max_failures < 1:
            raise ValueError("max_failures must be >= 1")
        with self._atomic():
            state, attempts, failures, _ = self._task_state(job_id, index)
            if state in ("done", "failed"):
                return FailureOutcome.IGNORED
            dup = self._conn.execute(
                "SELECT 1 FROM failures WHERE job_id=? AND idx=? AND attempt=?", (job_id, index, result.attempt)
            ).fetchone()
            if dup is not None:
                return FailureOutcome.IGNORED
            out_of_failures = failures + 1 >= max_failures
            if state == "running" and result.attempt != attempts:
                outcome = FailureOutcome.COUNTED
            elif out_of_failures:
                outcome = FailureOutcome.FAILED
            else:
                outcome = FailureOutcome.REQUEUED if state == "running" else FailureOutcome.COUNTED
            new_state = {"requeued": "pending", "failed": "failed", "counted": state}[outcome]
            self._emit({"op": "failure", "job": job_id, "task": index, "result": result.to_dict(), "state": new_state})
            return outcome

    def result(self, job_id: str, index: int) -> ResultRecord | None:
        """The task's successful result, or None."""
        with self._mutex:
            row = self._conn.execute(
                f"SELECT {_RESULT_COLS} FROM results WHERE job_id=? AND idx=?", (job_id, index)
            ).fetchone()
            return None if row is None else _result_from_row(row)

    def results(self, job_id: str) -> Iterator[tuple[int, ResultRecord]]:
        """(index, result) for every task of the job that has a result, by index."""
        with self._mutex:
            rows = self._conn.execute(
                f"SELECT idx, {_RESULT_COLS} FROM results WHERE job_id=? ORDER BY idx", (job_id,)
            ).fetchall()
        for row in rows:
            yield row[0], _result_from_row(row[1:])

    def results_since(self, job_id: str, after: int) -> tuple[list[tuple[int, ResultRecord]], int]:
        """(index, result) recorded after the mark `after` (0: all), and the mark to pass next time.

        The mark is the results table's rowid, which grows with every result this file records: it
        means nothing for another journal (a successor's, a replica's).
        """
        with self._mutex:
            rows = self._conn.execute(
                f"SELECT rowid, idx, {_RESULT_COLS} FROM results WHERE job_id=? AND rowid > ? ORDER BY rowid",
                (job_id, after),
            ).fetchall()
        return [(row[1], _result_from_row(row[2:])) for row in rows], max((row[0] for row in rows), default=after)

    def tasks_in(self, job_id: str, indices: list[int]) -> list[TaskRow]:
        """The tasks of the job among `indices`, by index."""
        with self._mutex:
            rows = [row[1:] for row in self._by_index(job_id, _TASK_COLS, indices)]
        return sorted((_task_from_row(r) for r in rows), key=lambda t: t.index)

    def failures(self, job_id: str, index: int) -> list[ResultRecord]:
        """Every failed attempt of the task, oldest attempt first."""
        with self._mutex:
            rows = self._conn.execute(
                f"SELECT {_RESULT_COLS} FROM failures WHERE job_id=? AND idx=? ORDER BY attempt", (job_id, index)
            ).fetchall()
            return [_result_from_row(r) for r in rows]

    # ----------------------------------------------------------- replication

    def _last_seq(self) -> int:
        if self._seq is None:
            self._seq = self._conn.execute("SELECT COALESCE(MAX(seq), 0) FROM changes").fetchone()[0]
        return self._seq

    def _epoch(self) -> int:
        if self._ep is None:
            self._ep = int(self._conn.execute("SELECT value FROM meta WHERE key='epoch'").fetchone()[0])
        return self._ep

    def last_seq(self) -> int:
        """Seq of the newest change held (0 for an empty journal)."""
        with self._mutex:
            return self._last_seq()

    def epoch(self) -> int:
        """The CE epoch this journal is at (1 for a new journal)."""
        with self._mutex:
            return self._epoch()

    def bump_epoch(self, at_least: int | None = None) -> int:
        """Take over: move to epoch ``max(epoch + 1, at_least)``, logged as a change; returns it."""
        with self._atomic():
            new = max(self._epoch() + 1, at_least or 0)
            self._set_epoch(new)  # before _emit, so the change itself carries the new epoch
            self._emit({"op": "epoch", "epoch": new})
            return new

    def _set_epoch(self, epoch: int) -> None:
        self._conn.execute("UPDATE meta SET value=? WHERE key='epoch'", (str(epoch),))
        self._ep = epoch

    def changes_since(self, seq: int, limit: int = 1000, max_bytes: int | None = None) -> list[Change]:
        """Changes with seq > ``seq``, oldest first, at most ``limit`` of them.

        With ``max_bytes``, no more than their payloads' size adds up to (but always the first):
        a batch must fit in one bus message, and a big job's first change nearly fills one alone.
        """
        with self._mutex:
            rows = self._conn.execute(
                "SELECT seq, epoch, payload FROM changes WHERE seq > ? ORDER BY seq LIMIT ?", (seq, limit)
            ).fetchall()
        if max_bytes is not None:
            total = 0
            for n, (_, _, payload) in enumerate(rows):
                total += len(payload)
                if total > max_bytes and n > 0:
                    rows = rows[:n]
                    break
        return [Change(s, e, json.loads(p)) for s, e, p in rows]

    def apply(self, changes: Iterable[Change]) -> int:
        """Replica side: apply shipped changes in one transaction; returns how many were new.

        Changes already held (seq <= last_seq) are skipped after checking they are identical
        (else JournalDivergenceError). A missing seq raises JournalGapError and a change from an
        epoch older than this journal's raises StaleEpochError; either way nothing is applied.
        """
        todo = sorted(changes, key=lambda c: c.seq)
        applied = 0
        with self._atomic():
            for ch in todo:
                last = self._last_seq()
                text = _canon(ch.payload)
                if ch.seq <= last:
                    row = self._conn.execute("SELECT epoch, payload FROM changes WHERE seq=?", (ch.seq,)).fetchone()
                    if row is None or row[0] != ch.epoch or row[1] != text:
                        raise JournalDivergenceError(f"change {ch.seq} differs from the one held: histories forked")
                    continue
                if ch.seq != last + 1:
                    raise JournalGapError(f"expected change {last + 1}, got {ch.seq}")
                current = self._epoch()
                if ch.epoch < current:
                    raise StaleEpochError(f"change {ch.seq} is from epoch {ch.epoch}, journal is at epoch {current}")
                if ch.epoch > current:
                    self._set_epoch(ch.epoch)
                self._apply_payload(ch.payload)
                self._conn.execute(
                    "INSERT INTO changes (seq, epoch, payload) VALUES (?, ?, ?)", (ch.seq, ch.epoch, text)
                )
                self._seq = ch.seq
                applied += 1
        return applied

    def _apply_payload(self, p: dict[str, Any]) -> None:
        """Turn one logical change into table rows. The single place state is written, primary and replica alike."""
        c = self._conn
        op = p["op"]
        if op == "job":
            c.execute(
                "INSERT INTO jobs (job_id, spec, submitter, state, created_at, n_tasks) VALUES (?,?,?,?,?,?)",
                (p["job"], _canon(p["spec"]), p["submitter"], "running", p["created_at"], len(p["tasks"])),
            )
            c.executemany(
                "INSERT INTO tasks (job_id, idx, spec, state) VALUES (?,?,?,'pending')",
                [(p["job"], i, _canon(t)) for i, t in enumerate(p["tasks"])],
            )
        elif op == "job_state":
            finished = p["at"] if p["state"] in FINISHED_JOB_STATES else None
            c.execute("UPDATE jobs SET state=?, finished_at=? WHERE job_id=?", (p["state"], finished, p["job"]))
        elif op == "started":
            self._apply_started(p["job"], p["node"], p["at"], p["tasks"])
        elif op == "running":  # one task, as written before "started" (kept: journals outlive versions)
            self._apply_started(p["job"], p["node"], p["at"], [[p["task"], p["attempt"]]])
        elif op == "requeue":
            c.execute(
                "UPDATE tasks SET state='pending', node_id=NULL, started_at=NULL WHERE job_id=? AND idx=?",
                (p["job"], p["task"]),
            )
        elif op == "results":
            self._apply_results(p["job"], p["results"])
        elif op == "result":  # one task, as written before "results"
            self._apply_results(p["job"], [[p["task"], p["result"]]])
        elif op == "failure":
            r = ResultRecord.from_dict(p["result"])
            c.execute(
                f"INSERT INTO failures (job_id, idx, {_RESULT_COLS}) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                (p["job"], p["task"], *_result_row(r)),
            )
            if p["state"] == "running":
                c.execute("UPDATE tasks SET failures=failures+1 WHERE job_id=? AND idx=?", (p["job"], p["task"]))
            else:
                c.execute(
                    "UPDATE tasks SET failures=failures+1, state=?, node_id=NULL, started_at=NULL"
                    " WHERE job_id=? AND idx=?",
                    (p["state"], p["job"], p["task"]),
                )
        elif op == "epoch":
            self._set_epoch(p["epoch"])
        else:
            raise JournalError(f"unknown change op {op!r} (written by a newer BonjourGrid?)")

    def _apply_started(self, job_id: str, node: str, at: float, tasks: list[list[int]]) -> None:
        c = self._conn
        tried = dict(self._by_index(job_id, "tried_nodes", [i for i, _ in tasks]))
        rows = []
        for index, attempt in tasks:
            nodes = json.loads(tried[index])
            if node not in nodes:
                nodes.append(node)
            rows.append((node, attempt, at, _canon(nodes), job_id, index))
        c.executemany(
            "UPDATE tasks SET state='running', node_id=?, attempts=?, started_at=?, tried_nodes=?"
            " WHERE job_id=? AND idx=?",
            rows,
        )

    def _apply_results(self, job_id: str, results: list[list[Any]]) -> None:
        c = self._conn
        rows = [(job_id, index, *_result_row(ResultRecord.from_dict(r))) for index, r in results]
        c.executemany(f"INSERT INTO results (job_id, idx, {_RESULT_COLS}) VALUES (?,?,?,?,?,?,?,?,?,?,?)", rows)
        c.executemany("UPDATE tasks SET state='done' WHERE job_id=? AND idx=?", [(job_id, i) for i, _ in results])

    # --------------------------------------------------------------- helpers

    def dump(self) -> dict[str, Any]:
        """Every job, task, result and failure as plain data: for tests, debugging and replica checks."""
        with self._mutex:
            c = self._conn
            return {
                "epoch": self._epoch(),
                "jobs": c.execute("SELECT * FROM jobs ORDER BY job_id").fetchall(),
                "tasks": c.execute("SELECT * FROM tasks ORDER BY job_id, idx").fetchall(),
                "results": c.execute("SELECT * FROM results ORDER BY job_id, idx").fetchall(),
                "failures": c.execute("SELECT * FROM failures ORDER BY job_id, idx, attempt").fetchall(),
            }
