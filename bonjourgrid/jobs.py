"""Jobs on this node: submit (become a coordinator), status, list, and results export."""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import backend as backends
from . import nodestate as ns
from .announcement import Role
from .coordinator import CoordinatorCE
from .jobspec import JobFileError, JobSpec
from .journal import Journal, JournalError

if TYPE_CHECKING:
    from .node import NodeDaemon


class JobRequestError(Exception):
    """A request about a job that cannot be served; the message is for the user."""


def ces_dir(daemon: NodeDaemon) -> Path:
    return daemon.config.state_dir / "ces"


async def submit(daemon: NodeDaemon, body: dict[str, Any]) -> CoordinatorCE:
    try:
        spec = JobSpec.from_dict(body.get("job") or {}, origin="submitted job")
    except JobFileError as e:
        raise JobRequestError(str(e)) from None
    try:
        backends.load(spec.backend)
    except backends.BackendError as e:
        raise JobRequestError(str(e)) from None
    state = daemon.machine.state
    if state.role is not Role.IDLE:
        raise JobRequestError(
            f"this node is busy as a {state.role.value} of CE {state.ce}; submit from another node or wait"
        )
    job_id = f"{spec.name[:40]}-{secrets.token_hex(3)}"
    ce = CoordinatorCE(daemon, spec, job_id, ces_dir(daemon) / job_id,
                       broker_url=body.get("broker") or daemon.config.broker_url)
    # Claim the role first, so a second submit arriving meanwhile is refused.
    await daemon.feed(ns.Coordinate(ce.ce, ce.epoch))
    daemon.ces[job_id] = ce
    try:
        await ce.start()
    except Exception as e:
        await ce.cancel(f"could not start: {e}")
        await daemon.feed(ns.EndCoordination(ce.ce))
        raise JobRequestError(f"could not start the computing element: {e}") from e

    async def finished(c: CoordinatorCE) -> None:
        await daemon.feed(ns.EndCoordination(c.ce))

    ce.on_finish = finished
    await daemon.feed(ns.Coordinate(ce.ce, ce.epoch, bus=ce.bus_url, data=ce.data.url if ce.data else None))
    return ce


def job_status(daemon: NodeDaemon, job: str) -> dict[str, Any]:
    ce = daemon.ces.get(job)
    if ce is not None:
        return ce.status()
    path = ces_dir(daemon) / job / "status.json"
    if "/" in job or not job or not path.is_file():
        raise JobRequestError(f"no job {job!r} on this node (see `bonjourgrid jobs`)")
    return json.loads(path.read_text())


def list_jobs(daemon: NodeDaemon) -> list[dict[str, Any]]:
    out = []
    root = ces_dir(daemon)
    names = {p.name for p in root.iterdir()} if root.is_dir() else set()
    for job in sorted(names | set(daemon.ces)):
        with contextlib.suppress(JobRequestError, OSError, ValueError):
            out.append(job_status(daemon, job))
    return sorted(out, key=lambda s: s.get("seconds", 0))


async def export(daemon: NodeDaemon, job: str, dest: Path) -> dict[str, Any]:
    """Write a job's results under `dest`: per task stdout, stderr, outputs/, result.json; and summary.json."""
    status = job_status(daemon, job)
    ce = daemon.ces.get(job)
    if ce is not None:
        async with ce.journal_lock:
            if ce.journal is not None:  # still coordinating: export what is recorded so far
                return await asyncio.to_thread(_export, ce.journal, ce.dir, job, dest, status)
    try:
        journal = await asyncio.to_thread(Journal.open, ces_dir(daemon) / job / "journal.db")
    except JournalError as e:
        raise JobRequestError(f"cannot read the journal of {job}: {e}") from None
    try:
        return await asyncio.to_thread(_export, journal, ces_dir(daemon) / job, job, dest, status)
    finally:
        journal.close()


def _export(journal: Journal, ce_dir: Path, job: str, dest: Path, status: dict[str, Any]) -> dict[str, Any]:
    if not dest.is_absolute():
        raise JobRequestError("the results directory must be an absolute path")
    dest.mkdir(parents=True, exist_ok=True)
    row = journal.job(job)
    if row is None:
        raise JobRequestError(f"the journal has no job {job}")
    width = len(str(max(row.n_tasks - 1, 0)))
    tasks = []
    for t in journal.tasks(job):
        rec = journal.result(job, t.index)
        if rec is None and t.state == "failed":
            fails = journal.failures(job, t.index)
            rec = fails[-1] if fails else None
        entry: dict[str, Any] = {"index": t.index, "state": t.state, "argv": t.spec.get("argv"),
                                 "attempts": t.attempts}
        if rec is not None:
            tdir = dest / f"{t.index:0{width}d}"
            tdir.mkdir(exist_ok=True)
            (tdir / "stdout").write_bytes(rec.stdout)
            (tdir / "stderr").write_bytes(rec.stderr)
            src = ce_dir / "outputs" / str(t.index)
            if t.state == "done" and src.is_dir():
                shutil.copytree(src, tdir / "outputs", dirs_exist_ok=True)
            entry.update(exit_code=rec.exit_code, node=rec.node_id, attempt=rec.attempt,
                         seconds=round(rec.finished_at - rec.started_at, 3),
                         outputs=[o.to_dict() for o in rec.outputs], **rec.extra)
            (tdir / "result.json").write_text(json.dumps(entry, indent=2))
        tasks.append(entry)
    summary = {**status, "results_dir": str(dest), "tasks": tasks}
    (dest / "summary.json").write_text(json.dumps(summary, indent=2))
    return {**status, "results_dir": str(dest)}
