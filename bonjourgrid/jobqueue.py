"""Jobs submitted on a node while it coordinates another one: kept on disk, started in turn.

A desktop's owner submits a second sweep before the first ends, as HTCondor users queue many
clusters from one submit machine. Refusing it ("submit from another node or wait") left the
waiting to the user. A node coordinates one CE at a time (its announcement names one), so the
second job waits here and starts the moment the first one ends.

Each queued job is a directory under `<state>/ces/<job>/` holding `queued.json` (the job, its
broker, when it was submitted and the manifest of its inputs). Inputs are staged when the job is
queued: it runs on the files as they were when it was submitted, even if they change or go away
meanwhile. The queue outlives the node daemon: a daemon that stops or crashes starts its queued
jobs when it comes back. Only this node holds them, as HTCondor's queue lives on its schedd; they
are not replicated until they start.

A queued job's directory gets its journal when the job starts; `queued.json` then goes. A
directory holding the marker and a journal or a final `status.json` (a crash in between) belongs
to a job that left the queue: the marker is dropped.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .datasrv import sha256_file
from .jobspec import JobFileError, JobSpec
from .paths import replace_file
from .retention import SUBMITTED_HERE

log = logging.getLogger("bonjourgrid.queue")

QUEUED_MARKER = "queued.json"
JOURNAL_FILE = "journal.db"
STATUS_FILE = "status.json"  # a job's final status, written by its coordinator (or here: cancelled while queued)


class QueueError(Exception):
    """The job could not be queued (its inputs could not be staged: a missing file, a full disk)."""


@dataclass(frozen=True)
class QueuedJob:
    job_id: str
    spec: JobSpec
    broker: str | None
    submitted_at: float
    inputs: list[dict[str, Any]]  # the manifest of the staged inputs


def stage_inputs(spec: JobSpec, ce_dir: Path) -> list[dict[str, Any]]:
    """Copy the job's inputs into `ce_dir/inputs/`, named by content, so workers fetch each once."""
    store = ce_dir / "inputs"
    store.mkdir(parents=True, exist_ok=True)
    manifest = []
    for f in spec.inputs:
        sha = sha256_file(f.source)
        dest = store / sha
        if not dest.exists():
            shutil.copyfile(f.source, dest)
        manifest.append({"dest": f.dest, "sha256": sha, "size": dest.stat().st_size})
    return manifest


class JobQueue:
    """First submitted, first started. Not thread-safe: the node's event loop owns it."""

    def __init__(self, root: Path) -> None:
        self.root = root  # <state>/ces
        self.jobs: list[QueuedJob] = []

    def load(self) -> None:
        """The jobs queued before the daemon last stopped. A marker that cannot be read is logged and kept."""
        found = []
        for marker in sorted(self.root.glob(f"*/{QUEUED_MARKER}")) if self.root.is_dir() else ():
            if (marker.parent / JOURNAL_FILE).exists() or (marker.parent / STATUS_FILE).exists():
                self._drop_marker(marker.parent.name)  # it started, or was cancelled, before the crash
                continue
            try:
                d = json.loads(marker.read_text())
                found.append(QueuedJob(marker.parent.name, JobSpec.from_dict(d["job"], origin=str(marker)),
                                       d.get("broker"), float(d["submitted_at"]), list(d["inputs"])))
            except (OSError, ValueError, KeyError, TypeError, JobFileError) as e:
                log.error("cannot read the queued job %s: %s; left as it is", marker, e)
        self.jobs = sorted(found, key=lambda q: (q.submitted_at, q.job_id))
        if self.jobs:
            log.info("%d queued job(s) from before the restart", len(self.jobs))

    def add(self, job_id: str, spec: JobSpec, broker: str | None) -> QueuedJob:
        """Stage the inputs and write the marker; nothing is left behind if either fails. Blocking."""
        ce_dir = self.root / job_id
        try:
            ce_dir.mkdir(parents=True)
            inputs = stage_inputs(spec, ce_dir)
            q = QueuedJob(job_id, spec, broker, time.time(), inputs)
            (ce_dir / SUBMITTED_HERE).write_text(json.dumps({"job_id": job_id, "name": spec.name}))
            replace_file(ce_dir / QUEUED_MARKER, json.dumps(
                {"job": spec.to_dict(), "broker": broker, "submitted_at": q.submitted_at, "inputs": inputs}))
        except OSError as e:
            shutil.rmtree(ce_dir, ignore_errors=True)
            raise QueueError(f"cannot queue the job: {e}") from None
        self.jobs.append(q)
        return q

    def pop(self) -> QueuedJob | None:
        return self.jobs.pop(0) if self.jobs else None

    def remove(self, job_id: str) -> QueuedJob | None:
        for q in self.jobs:
            if q.job_id == job_id:
                self.jobs.remove(q)
                return q
        return None

    def find(self, job_id: str) -> tuple[int, QueuedJob] | None:
        """(jobs ahead of it in the queue, the job)."""
        for i, q in enumerate(self.jobs):
            if q.job_id == job_id:
                return i, q
        return None

    def left(self, job_id: str) -> None:
        """The job left the queue for good (started, failed to start, cancelled)."""
        self._drop_marker(job_id)

    def _drop_marker(self, job_id: str) -> None:
        try:
            (self.root / job_id / QUEUED_MARKER).unlink(missing_ok=True)
        except OSError as e:  # harmless: a marker beside a journal is dropped at the next start
            log.warning("cannot remove the queue marker of %s: %s", job_id, e)
