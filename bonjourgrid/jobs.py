"""Jobs on this node: submit (become a coordinator), status, list, and results export."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
import secrets
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import backend as backends
from . import nodestate as ns
from .announcement import Role
from .coordinator import CoordinatorCE
from .jobqueue import JOURNAL_FILE, STATUS_FILE, QueuedJob, QueueError
from .jobspec import JobFileError, JobSpec
from .journal import FINISHED_JOB_STATES, Journal, JournalError, ResultRecord
from .paths import replace_file
from .replication import LEFT_MARKER
from .sandbox import safe_join
from .summary import summary_text

log = logging.getLogger("bonjourgrid.jobs")

if TYPE_CHECKING:
    from .node import NodeDaemon


class JobRequestError(Exception):
    """A request about a job that cannot be served; the message is for the user."""


def ces_dir(daemon: NodeDaemon) -> Path:
    return daemon.config.state_dir / "ces"


async def submit(daemon: NodeDaemon, body: dict[str, Any]) -> dict[str, Any]:
    """Start the job at once, or queue it while this node coordinates another (`jobqueue`).

    Returns `job`, and `queued`: how many jobs are ahead of it, if it waits.
    """
    try:
        spec = JobSpec.from_dict(body.get("job") or {}, origin="submitted job")
    except JobFileError as e:
        raise JobRequestError(str(e)) from None
    try:
        backends.load(spec.backend)
    except backends.BackendError as e:
        raise JobRequestError(str(e)) from None
    job_id = f"{spec.name[:40]}-{secrets.token_hex(3)}"
    broker = body.get("broker") or None
    async with daemon.jobs_lock:
        if daemon.machine.state.role is not Role.COORDINATOR and not daemon.queue.jobs:
            await _start(daemon, spec, job_id, broker)
            return {"job": job_id}
        try:
            await asyncio.to_thread(daemon.queue.add, job_id, spec, broker)
        except QueueError as e:
            raise JobRequestError(str(e)) from None
    ahead = _ahead(daemon, job_id)
    log.info("job %s queued: %d job(s) to go before it", job_id, ahead)
    daemon.spawn(start_queued(daemon))  # a no-op while this node coordinates
    return {"job": job_id, "queued": ahead}


async def start_queued(daemon: NodeDaemon) -> None:
    """Start queued jobs, first submitted first, until one runs. Called whenever a CE here ends."""
    async with daemon.jobs_lock:
        while daemon.machine.state.role is not Role.COORDINATOR and not daemon.stopping:
            q = daemon.queue.pop()
            if q is None:
                return
            try:
                await _start(daemon, q.spec, q.job_id, q.broker, q.inputs, q.submitted_at)
            except JobRequestError as e:  # its status says why; the next one gets its turn
                log.error("queued job %s: %s", q.job_id, e)
            except Exception as e:  # before its CE existed: nothing else would say why it never ran
                log.exception("queued job %s could not start", q.job_id)
                with contextlib.suppress(OSError):
                    _end_queued(daemon, q, "failed", f"could not start: {e}")
            daemon.queue.left(q.job_id)


def _ahead(daemon: NodeDaemon, job: str) -> int:
    """How many jobs start before `job`: the one running here, and those queued before it."""
    found = daemon.queue.find(job)
    running = daemon.machine.state.role is Role.COORDINATOR
    return (found[0] if found else 0) + running


async def _start(daemon: NodeDaemon, spec: JobSpec, job_id: str, broker: str | None,
                 inputs: list[dict[str, Any]] | None = None, submitted_at: float | None = None) -> CoordinatorCE:
    ce = CoordinatorCE(daemon, spec, job_id, ces_dir(daemon) / job_id, broker_url=broker or daemon.config.broker_url,
                       inputs=inputs, submitted_at=submitted_at, **_timing(daemon))
    # Claim the role first. A node lent to another CE leaves it in the same step: its owner's job comes first.
    await daemon.feed(ns.Coordinate(ce.ce, ce.epoch, preempts=True))
    daemon.ces[job_id] = ce
    try:
        await ce.start()
    except Exception as e:
        try:
            await ce.cancel(f"could not start: {e}")
        except Exception:  # whatever it left behind, the node must not stay a coordinator
            log.exception("CE %s: cleaning up after a failed start failed", ce.ce)
        finally:
            await daemon.feed(ns.EndCoordination(ce.ce))
        raise JobRequestError(f"could not start the computing element: {e}") from e

    await _announce(daemon, ce)
    return ce


def _timing(daemon: NodeDaemon) -> dict[str, float]:
    return {"lease_s": daemon.config.lease_s, "failover_timeout_s": daemon.config.failover_timeout_s}


async def _announce(daemon: NodeDaemon, ce: CoordinatorCE) -> None:
    """Publish the running CE in the node's Coordinator service; back to Idle when it ends."""

    async def finished(c: CoordinatorCE) -> None:
        await daemon.feed(ns.EndCoordination(c.ce))
        daemon.spawn(start_queued(daemon))

    ce.on_finish = finished
    await daemon.feed(ns.Coordinate(ce.ce, ce.epoch, bus=ce.bus_url, data=ce.data.url if ce.data else None))


async def take_over(daemon: NodeDaemon, ce_id: str, epoch: int, replicas: tuple[str, ...] = ()) -> CoordinatorCE | None:
    """This replica becomes the CE's coordinator, from its copy of the journal.

    The other replicas of the old coordinator stay replicas first: they hold almost all of the
    journal already, so a second failure soon after the first still finds an up-to-date copy.
    """
    ce_dir = ces_dir(daemon) / ce_id
    try:
        journal = await asyncio.to_thread(Journal.open, ce_dir / JOURNAL_FILE)
        try:
            job = CoordinatorCE.job_from_journal(journal, ce_id)
        finally:
            journal.close()
    except (JournalError, ValueError, JobFileError) as e:
        log.error("CE %s: cannot take over, no usable replica of the journal: %s", ce_id, e)
        await daemon.feed(ns.Release(ce_id, daemon.machine.state.epoch))
        return None
    ce = CoordinatorCE(daemon, job, ce_id, ce_dir, broker_url=daemon.config.broker_url, epoch=epoch, resume=True,
                       **_timing(daemon))
    try:
        await daemon.feed(ns.Coordinate(ce_id, epoch))
    except ns.InvalidTransition as e:
        log.error("CE %s: cannot take over: %s", ce_id, e)
        return None
    daemon.ces[ce_id] = ce
    ce.replication.replicas = [r for r in replicas if r != daemon.node_id]
    try:
        await ce.start()
    except Exception as e:
        log.exception("CE %s: takeover failed", ce_id)
        await ce.cancel(f"takeover failed: {e}")
        await daemon.feed(ns.EndCoordination(ce_id))
        return None
    log.warning("CE %s: took over as coordinator, epoch %d", ce_id, ce.epoch)
    await _announce(daemon, ce)
    return ce


def job_status(daemon: NodeDaemon, job: str) -> dict[str, Any]:
    ce = daemon.ces.get(job)
    if ce is not None:
        return ce.status()
    if "/" in job or not job:
        raise JobRequestError(f"no job {job!r} on this node (see `bonjourgrid jobs`)")
    path = ces_dir(daemon) / job / STATUS_FILE
    if path.is_file():  # we coordinated it
        return json.loads(path.read_text())
    found = daemon.queue.find(job)
    if found:
        ahead = _ahead(daemon, job)
        return queued_status(found[1], "queued", f"queued on this node: {ahead} job{'s' if ahead != 1 else ''} "
                                                 "to go before it")
    replica = ces_dir(daemon) / job / JOURNAL_FILE
    if replica.is_file() and (daemon.worker is None or daemon.worker.ce != job):  # we were one of its replicas
        try:
            return _status_from_journal(replica, job)
        except (JournalError, OSError) as e:
            raise JobRequestError(f"cannot read the replica of {job}: {e}") from None
    raise JobRequestError(f"no job {job!r} on this node (see `bonjourgrid jobs`)")


def queued_status(q: QueuedJob, state: str, message: str) -> dict[str, Any]:
    """A job's status before it started, with the fields of a running one's."""
    return {"job": q.job_id, "name": q.spec.name, "backend": q.spec.backend, "state": state, "message": message,
            "tasks_total": len(q.spec.tasks), "tasks_done": 0, "tasks_failed": 0, "tasks_running": 0,
            "tasks_pending": len(q.spec.tasks), "workers": 0, "workers_used": 0,
            "submitted_at": round(q.submitted_at, 3), "seconds": round(time.time() - q.submitted_at, 3),
            "tasks_per_second": 0.0}


def _end_queued(daemon: NodeDaemon, q: QueuedJob, state: str, message: str) -> None:
    """Its final status, as a coordinator writes one at the end. Raises OSError (a full disk)."""
    replace_file(ces_dir(daemon) / q.job_id / STATUS_FILE, json.dumps(queued_status(q, state, message)))


async def cancel(daemon: NodeDaemon, job: str) -> dict[str, Any]:
    """Cancel a running job, or take a queued one out of the queue (its final status says so)."""
    ce = daemon.ces.get(job)
    if ce is not None and ce.state in ("starting", "running"):
        await ce.cancel()
        return {"job": job, "state": ce.state}
    found = daemon.queue.find(job)
    if found is None:
        raise JobRequestError(f"no running or queued job {job!r} on this node")
    try:
        await asyncio.to_thread(_end_queued, daemon, found[1], "cancelled", "cancelled by the user before it started")
    except OSError as e:
        raise JobRequestError(f"cannot cancel {job}: {e}") from None
    daemon.queue.remove(job)
    daemon.queue.left(job)
    log.info("job %s cancelled while queued", job)
    return {"job": job, "state": "cancelled"}


def _status_from_journal(path: Path, job: str) -> dict[str, Any]:
    """A job's status as a replica of its journal has it (its coordinator may be gone).

    A copy this node stopped receiving when it left the CE before the end says `left`, not the
    `running` it froze at: the job went on without it.
    """
    journal = Journal.open(path)
    try:
        row = journal.job(job)
        if row is None:
            raise JobRequestError(f"no job {job!r} on this node (see `bonjourgrid jobs`)")
        states = [t.state for t in journal.tasks(job)]
        nodes = {rec.node_id for _, rec in journal.results(job)}
    finally:
        journal.close()
    end = row.finished_at or row.created_at
    state, message = row.state, "from a replica of the job's journal"
    left = path.parent / LEFT_MARKER
    if state not in FINISHED_JOB_STATES and left.is_file():
        state = "left"
        message = f"this node left the CE{_left_at(left)}: its copy of the journal stops there; " \
                  "the job's coordinator has its state"
    return {"job": job, "name": row.spec.get("name", job), "state": state, "tasks_total": row.n_tasks,
            "tasks_done": states.count("done"), "tasks_failed": states.count("failed"),
            "tasks_running": states.count("running"), "tasks_pending": states.count("pending"),
            "workers": 0, "workers_used": len(nodes), "submitted_at": round(row.created_at, 3),
            "seconds": round(end - row.created_at, 3),
            "tasks_per_second": 0.0,  # the same fields as a coordinator's status; no live figures
            "message": message, "replica": True}


def _left_at(marker: Path) -> str:
    """' at <local time>' from a replica's LEFT_MARKER, or '' if it cannot be read."""
    try:
        return time.strftime(" at %Y-%m-%d %H:%M", time.localtime(json.loads(marker.read_text())["left_at"]))
    except (OSError, ValueError, TypeError, KeyError, OverflowError):
        return ""


def list_jobs(daemon: NodeDaemon) -> list[dict[str, Any]]:
    out = []
    root = ces_dir(daemon)
    names = {p.name for p in root.iterdir()} if root.is_dir() else set()
    for job in sorted(names | set(daemon.ces)):
        with contextlib.suppress(JobRequestError, OSError, ValueError):
            out.append(job_status(daemon, job))
    return sorted(out, key=lambda s: (s.get("submitted_at") or 0, s["job"]))  # older status files lack it


async def export(daemon: NodeDaemon, job: str, dest: Path, after: int = 0, final: bool = True) -> dict[str, Any]:
    """Write a job's results under `dest`: per task stdout, stderr, outputs/, result.json; and summary.json.

    `after` and `final=False`: see `_export` (results stream into `dest` while the job runs).
    """
    status = job_status(daemon, job)
    ce = daemon.ces.get(job)
    if ce is None and not (ces_dir(daemon) / job / JOURNAL_FILE).is_file():
        why = status.get("message") or "it never started"
        raise JobRequestError(f"{job} has no results: it is {status['state']} ({why})")
    if ce is not None:
        async with ce.journal_lock:
            if ce.journal is not None:  # still coordinating: export what is recorded so far
                return await _write_results(ce.journal, ce.dir, job, dest, status, after, final)
    try:
        journal = await asyncio.to_thread(Journal.open, ces_dir(daemon) / job / JOURNAL_FILE)
    except JournalError as e:
        raise JobRequestError(f"cannot read the journal of {job}: {e}") from None
    try:
        return await _write_results(journal, ces_dir(daemon) / job, job, dest, status, after, final)
    finally:
        journal.close()


async def _write_results(journal: Journal, ce_dir: Path, job: str, dest: Path, status: dict[str, Any], after: int,
                         final: bool) -> dict[str, Any]:
    """`_export` off the event loop. A results directory that cannot be written (a full disk, not
    ours) is the user's to fix, and nothing is lost: say so, not "the node did not answer"."""
    try:
        return await asyncio.to_thread(_export, journal, ce_dir, job, dest, status, after, final)
    except OSError as e:
        raise JobRequestError(f"cannot write the results into {dest}: {e}; they are kept on this node: "
                              f"`bonjourgrid results {job} --dest DIR` writes them elsewhere") from None


def _export(journal: Journal, ce_dir: Path, job: str, dest: Path, status: dict[str, Any], after: int = 0,
            final: bool = True) -> dict[str, Any]:
    """Write the results; returns the status with `results_dir` and `mark`.

    `after` is the `mark` an earlier call on this same journal returned: the tasks done by then are
    not written again. `final=False` writes only the tasks done since, and no summary.json: the
    results then stream into `dest` while the job runs.
    """
    if not dest.is_absolute():
        raise JobRequestError("the results directory must be an absolute path")
    dest.mkdir(parents=True, exist_ok=True)
    row = journal.job(job)
    if row is None:
        raise JobRequestError(f"the journal has no job {job}")
    width = len(str(max(row.n_tasks - 1, 0)))
    fresh, mark = journal.results_since(job, after)  # one query, not one per task
    results = dict(journal.results(job)) if final and after else dict(fresh)  # a summary lists every task
    new = {i for i, _ in fresh}
    tasks = []
    writes: list[tuple[str, ResultRecord, dict[str, Any], Path | None]] = []
    for t in journal.tasks(job) if final else journal.tasks_in(job, list(new)):
        rec = results.get(t.index)
        if rec is None and t.state == "failed":
            fails = journal.failures(job, t.index)
            rec = fails[-1] if fails else None
        entry: dict[str, Any] = {"index": t.index, "state": t.state, "argv": t.spec.get("argv"),
                                 "attempts": t.attempts}
        if rec is not None:
            entry.update(exit_code=rec.exit_code, node=rec.node_id, attempt=rec.attempt,
                         seconds=round(rec.finished_at - rec.started_at, 3),
                         outputs=[o.to_dict() for o in rec.outputs], **rec.extra)
            if t.index in new or t.state != "done":  # a done task's files are final: written once
                src = ce_dir / "outputs" / str(t.index)
                writes.append((f"{t.index:0{width}d}", rec, entry, src if t.state == "done" else None))
        tasks.append(entry)
    # Creating files is what takes time (tens of thousands for a big sweep), so relative to a
    # directory descriptor. At the end, in parallel: threads hide NFS round trips (lab home
    # directories) and, on ext4 without a journal, the inode allocator's scan of recently freed
    # inodes. While the job runs, in this one thread: there the tasks need the CPU, and handing
    # files to a pool cost a third more of it (docs/architecture.md §6).
    root = os.open(dest, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if final:
            with ThreadPoolExecutor(EXPORT_THREADS, thread_name_prefix="bg-export") as pool:
                list(pool.map(lambda w: _export_task(root, dest, *w), writes))
        else:
            for w in writes:
                _export_task(root, dest, *w)
    finally:
        os.close(root)
    if final:
        summary = {**status, "results_dir": str(dest), "tasks": tasks}
        (dest / "summary.json").write_text(summary_text(summary))
    return {**status, "results_dir": str(dest), "mark": mark}


EXPORT_THREADS = 8


def _export_task(root: int, dest: Path, name: str, rec: ResultRecord, entry: dict[str, Any],
                 outputs: Path | None) -> None:
    with contextlib.suppress(FileExistsError):
        os.mkdir(name, dir_fd=root)
    for file, data in (("stdout", rec.stdout), ("stderr", rec.stderr),
                       ("result.json", json.dumps(entry, indent=2).encode())):
        out = os.open(f"{name}/{file}", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644, dir_fd=root)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(out, view):]
        finally:
            os.close(out)
    if outputs is not None and rec.outputs and outputs.is_dir():
        shutil.copytree(outputs, dest / name / "outputs", dirs_exist_ok=True)


CHUNK = 4 << 20  # per control reply: a frame holds 8 MiB


async def exported_dir(daemon: NodeDaemon, job: str) -> Path:
    """The job's results as files on this node (written once the job is over), for remote readers."""
    dest = daemon.config.state_dir / "exports" / job
    status = job_status(daemon, job)
    if status.get("state") in FINISHED_JOB_STATES and (dest / "summary.json").is_file():
        os.utime(dest)  # being read: not "untouched" for the clean-up (retention.py)
        return dest
    await export(daemon, job, dest)
    return dest


async def result_list(daemon: NodeDaemon, job: str) -> dict[str, Any]:
    root = await exported_dir(daemon, job)
    files = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
    return {"files": [[f, (root / f).stat().st_size] for f in files], "status": job_status(daemon, job)}


def result_file(daemon: NodeDaemon, job: str, rel: str, offset: int) -> dict[str, Any]:
    try:
        path = safe_join(daemon.config.state_dir / "exports" / job, rel)
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read(CHUNK)
    except (ValueError, OSError) as e:
        raise JobRequestError(f"cannot read {rel} of {job}: {e}") from None
    return {"data": base64.b64encode(data).decode(), "eof": len(data) < CHUNK}
