"""A computing element, coordinator side: journal, bus, data endpoint, recruitment, results, release.

Created on the submitting node by the node daemon. The backend's coordinator
half decides how tasks reach workers; everything around it (who is in the
CE, what is durable, when the job is over) lives here, the same for every
backend.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from . import backend as backends
from .broker import BrokerError, BrokerHandle, start_ce_broker
from .bus import RECONNECT_EVERY_S, Bus, BusError, bus_credentials, topic
from .datasrv import DataServer, sha256_file
from .election import supersedes
from .envelope import Envelope
from .jobqueue import STATUS_FILE, stage_inputs
from .jobspec import JobSpec
from .journal import FailureOutcome, Journal, JournalError, JournalWriteError, OutputFile, ResultRecord
from .paths import replace_file
from .ratelimit import Sometimes
from .replication import ReplicationSender
from .retention import SUBMITTED_HERE
from .sandbox import safe_join
from .scheduler import Dispatch, Needs, explain_no_match, recruitable
from .wire import request

if TYPE_CHECKING:
    from .node import NodeDaemon

log = logging.getLogger("bonjourgrid.ce")
_T = TypeVar("_T")
_BUSY = object()  # the journal was held by another thread: not run on the event loop

FAILOVER_TIMEOUT_S = 1.0  # workers suspect the coordinator after this long without a heartbeat
# Results committed without an fsync (accept_results(durable=False)) are synced at least this often,
# and always before a worker that keeps them is let go.
SYNC_EVERY_S = 1.0
WORKER_TIMEOUT_S = 5.0
JOURNAL_RETRY_S = 1.0  # a refused journal write (a full disk) at the job's end: try again this often
LEASE_S = 30.0
RECRUIT_EVERY_S = 0.5
NO_MATCH_GRACE_S = 10.0  # a job nobody can serve fails after this, with the reason
REFUSED_BACKOFF_S = 5.0
FINAL_REPLICATION_S = 5.0  # at most, before the workers (and replicas) are released
RELEASE_WAIT_S = 2.0  # at the end, how long to wait for the workers' goodbyes
MEMBERS_LISTED = 32  # workers named in a heartbeat (a replica asks only a few of them anyway)


class CoordinatorCE:
    def __init__(self, daemon: NodeDaemon, job: JobSpec, job_id: str, ce_dir: Path, *,
                 broker_url: str | None = None, lease_s: float = LEASE_S,
                 worker_timeout_s: float = WORKER_TIMEOUT_S, epoch: int = 1, resume: bool = False,
                 failover_timeout_s: float = FAILOVER_TIMEOUT_S, inputs: list[dict[str, Any]] | None = None,
                 submitted_at: float | None = None) -> None:
        """`inputs` and `submitted_at`: for a job that was queued, its inputs already staged in
        `ce_dir` (their manifest) and when it was submitted."""
        self.daemon = daemon
        self.job = job
        self.job_id = job_id
        self.ce = job_id
        self.dir = ce_dir
        self.grid = daemon.config.grid
        self.key = daemon.config.key
        self.epoch = epoch
        self.resume = resume  # a takeover: the journal (a replica's) already holds the job
        self.failover_timeout_s = failover_timeout_s
        self.lease_s = lease_s
        self.worker_timeout_s = worker_timeout_s
        self.external_broker = broker_url
        self.needs = Needs(job.requires, job.cpus, job.memory_bytes)
        self.dispatch = Dispatch(range(len(job.tasks)))
        self.journal: Journal | None = None
        self.broker: BrokerHandle | None = None
        self.bus: Bus | None = None
        self.data: DataServer | None = None
        self.half: backends.CoordinatorHalf | None = None
        self.worker_config: dict[str, Any] = {}
        self.inputs: list[dict[str, Any]] = inputs or []
        self.staged = inputs is not None
        self.workers_seen: set[str] = set()
        self.recruited: dict[str, float] = {}  # node -> when it accepted (until it says hello)
        self.refused: dict[str, float] = {}  # node -> when it refused (back off)
        self.last_seen: dict[str, float] = {}
        self.sessions: dict[str, str] = {}
        self.state = "starting"
        self.message = ""
        self.storage_error: str | None = None  # the last refused write, until one succeeds (a full disk)
        self._say_storage = Sometimes()  # a nearly full disk refuses some writes, and workers resend every 3 s
        self._storage_recovery_owed = False
        self._owed = False  # tasks given back (the journal refused them) and still owed to their askers
        self.started_at = time.time()
        self.submitted_at = submitted_at  # None: when it started
        self.first_task_at: float | None = None
        self.last_result_at: float | None = None
        self.finished_at: float | None = None
        self.counts = {"done": 0, "failed": 0}
        self._done = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._servers_stopping: list[asyncio.Future[None]] = []
        self._lock = asyncio.Lock()
        self._worker_left = asyncio.Event()  # the end waits for the workers' goodbyes
        self._syncing: asyncio.Future[bool] | None = None
        self.journal_lock = asyncio.Lock()  # held by readers (export) so teardown never closes under them
        self.on_finish: Callable[[CoordinatorCE], Awaitable[None]] | None = None
        self.replication = ReplicationSender(self)
        self.stepped_down = False
        self._first_result_logged = False
        self._last_probe = 0.0
        self._moved_to: str | None = None  # a successor a node we asked to join told us of: next round steps down
        self._finisher: asyncio.Task[None] | None = None
        self._reconnecting: asyncio.Task[None] | None = None
        self._bus_auth: tuple[str, str] = ("", "")  # the CE broker's user and password, derived from the key
        self._say_broker = Sometimes()  # a broker that cannot start again is tried every RECONNECT_EVERY_S
        self.last_beat = time.monotonic()  # last heartbeat that reached the broker (a replica may ask)

    # ------------------------------------------------------------ lifecycle --

    @property
    def address(self) -> str:
        return self.daemon.config.addresses[0]

    async def start(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "outputs").mkdir(exist_ok=True)
        self.journal = await asyncio.to_thread(Journal.open, self.dir / "journal.db")
        if self.resume:
            self.epoch = await asyncio.to_thread(self.journal.bump_epoch, self.epoch)
            await asyncio.to_thread(self._restore)
        else:
            spec = self.job.to_dict()
            task_specs = spec.pop("tasks")
            await asyncio.to_thread(self.journal.create_job, self.job_id, spec, task_specs,
                                    submitter=self.daemon.node_id, created_at=self.started_at)
            (self.dir / SUBMITTED_HERE).write_text(json.dumps({"job_id": self.job_id, "name": self.job.name}))
            if not self.staged:
                self.inputs = await asyncio.to_thread(stage_inputs, self.job, self.dir)
        await asyncio.to_thread(self.journal.warm_up, self.job_id)
        (self.dir / "inputs.json").write_text(json.dumps(self.inputs))
        user, password = self._bus_auth = bus_credentials(self.key, self.grid, self.ce)
        if self.external_broker:
            # An external broker does not know our derived credentials: connect anonymously.
            # Every message is still sealed with the grid key, so nobody else can speak on it.
            url, user, password = self.external_broker, None, None
        else:
            self.broker = await start_ce_broker(self.daemon.config.ce_broker, self.address, username=user,
                                                password=password, log_file=self.dir / "broker.log")
            url = self.broker.url.replace("127.0.0.1", self.address)
        self.bus = Bus(url, self.key, self.grid, f"c-{self.daemon.node_id}-{self.ce}"[:64],
                       username=user, password=password, keepalive=2)
        await self.bus.connect()
        await self.bus.subscribe(topic(self.grid, self.ce, "coord"), self._on_coord_message)
        self.bus.on_disconnect = self._bus_lost
        loop = asyncio.get_running_loop()
        self.data = DataServer(self.key, self.ce, self.dir / "inputs", self.dir / "staging", self.address,
                               outputs_dir=self.dir / "outputs",
                               on_storage_error=lambda why: loop.call_soon_threadsafe(self._storage_refused, why))
        self.data.start()
        self.half = backends.load(self.job.backend).coordinator(self)
        self.worker_config = {
            "job": self.job_id,
            "backend": self.job.backend,
            "inputs": self.inputs,
            "outputs": list(self.job.outputs),
            "cpus": self.job.cpus,
            "memory_bytes": self.job.memory_bytes,
            "disk_bytes": self.job.disk_bytes,
            "timeout_s": self.job.timeout_s,
            "runtime": self.job.runtime,
            "bus_auth": user is not None,
            "image": self.job.image,
            "network": self.job.network,
            "failover_timeout": self.failover_timeout_s,
            "backend_config": await self.half.start(),
        }
        self.bus_url = url
        self.state = "running"
        log.info("CE %s: coordinating job %s (%d tasks, backend %s), bus %s, data %s", self.ce, self.job.name,
                 len(self.job.tasks), self.job.backend, url, self.data.url)
        self._tasks = [asyncio.ensure_future(self._heartbeat_loop()), asyncio.ensure_future(self._recruit_loop()),
                       asyncio.ensure_future(self.replication.run())]

    @classmethod
    def job_from_journal(cls, journal: Journal, job_id: str) -> JobSpec:
        """The job as the original coordinator recorded it (for a successor)."""
        row = journal.job(job_id)
        if row is None:
            raise ValueError(f"the journal holds no job {job_id}")
        return JobSpec.from_dict({**row.spec, "tasks": [t.spec for t in journal.tasks(job_id)]},
                                 origin=f"journal of {job_id}")

    def _restore(self) -> None:
        """A takeover: rebuild the in-memory state from the replicated journal."""
        assert self.journal is not None
        row = self.journal.job(self.job_id)
        assert row is not None
        self.started_at = row.created_at
        inputs = self.dir / "inputs.json"
        self.inputs = json.loads(inputs.read_text()) if inputs.is_file() else []
        pending, now = [], time.monotonic()
        for t in self.journal.tasks(self.job_id):
            if t.state == "pending":
                pending.append(t.index)
            elif t.state == "running" and t.node_id:
                # Its worker may still be running it: give it the worker timeout to reattach.
                self.dispatch.add_worker(t.node_id, 1)
                self.dispatch.claim(t.index, t.node_id)
                self.last_seen[t.node_id] = now
                self.workers_seen.add(t.node_id)
            elif t.state == "done":
                self.counts["done"] += 1
            elif t.state == "failed":
                self.counts["failed"] += 1
        self.dispatch.set_pending(pending)

    async def wait(self) -> None:
        await self._done.wait()

    async def cancel(self, reason: str = "cancelled by the user") -> None:
        if self.state in ("running", "starting"):
            self.message = reason
            if self.half:
                await self.half.cancel()
            await self._finish("cancelled")

    async def _finish(self, state: str) -> None:
        async with self._lock:
            if self._done.is_set():
                return
            started = self.state != "starting"
            self.state = "finishing"  # final only once torn down: readers then find the journal closed
            self.finished_at = time.time()
            if self.journal:
                await self._record_end(self.journal, state, self.finished_at, started)
                # Once the workers are released nobody would take over: the end, and every result,
                # must be on a replica's disk before, or a crash now would leave them on ours alone.
                await self._replicas_caught_up(FINAL_REPLICATION_S)
            me = asyncio.current_task()
            for t in self._tasks:
                if t is not me:  # _finish may run inside one of our own loops: let it complete
                    t.cancel()
            with contextlib.suppress(Exception):
                if self.bus and self.bus.connected:
                    await self.bus.publish(topic(self.grid, self.ce, "all"),
                                           self._env("release", {"state": state}))
                    await self._wait_for_byes(RELEASE_WAIT_S)
            log.info("CE %s: job %s %s (%d done, %d failed) in %.1fs%s", self.ce, self.job.name, state,
                     self.counts["done"], self.counts["failed"], self.finished_at - self.started_at,
                     f": {self.message}" if self.message else "")
            await self._teardown()
            if self.on_finish:
                await self.on_finish(self)  # the node goes back to Idle before anyone sees the end
            self.state = state
            self._write_summary()
            self._done.set()

    async def _record_end(self, journal: Journal, state: str, at: float, started: bool) -> None:
        """The end must be on disk before the workers go: wait for space if need be. A CE that
        never started (its journal may hold no job) tries once: it has nothing to lose."""
        while True:
            try:
                await self._journal_write(lambda: journal.set_job_state(self.job_id, state, at))
                return
            except JournalError as e:
                if not started:
                    return
                if not isinstance(e, JournalWriteError):
                    raise
                await asyncio.sleep(JOURNAL_RETRY_S)

    async def servers_stopped(self) -> None:
        """Wait until the broker and data server of a torn-down CE have exited (the node does, before it exits)."""
        await asyncio.gather(*self._servers_stopping, return_exceptions=True)

    async def _replicas_caught_up(self, timeout: float) -> None:
        assert self.journal is not None
        last = self.journal.committed_seq
        self.replication.hurry()
        if not await _until(lambda: all(self.replication.acked.get(r, 0) >= last for r in self.replication.replicas),
                            self.replication.acked_changed, timeout):
            log.warning("CE %s: the replicas did not confirm the end of the job within %gs", self.ce, timeout)

    async def _wait_for_byes(self, timeout: float) -> None:
        """Keep the broker up until every worker said goodbye, so no release is lost with it."""
        await _until(lambda: not self.dispatch.workers, self._worker_left, timeout)

    async def _teardown(self) -> None:
        if self.half:
            with contextlib.suppress(Exception):
                await self.half.stop()
        if self.bus:
            with contextlib.suppress(Exception):
                await self.bus.close()
        # Once the bus is closed the broker and the data server serve nobody: every worker said
        # goodbye, the replicas hold every file. Both take a while to exit (Mosquitto up to 0.12 s
        # after SIGTERM once clients had connected, the data server up to one poll interval), which
        # the user waited for at the end of every job: they stop in the background (servers_stopped).
        self._servers_stopping += [asyncio.ensure_future(asyncio.to_thread(x.stop))
                                   for x in (self.broker, self.data) if x is not None]
        async with self.journal_lock:
            if self.journal:
                self.journal.close()
                self.journal = None

    # ------------------------------------------------------------- messages --

    def _env(self, kind: str, body: dict[str, Any]) -> Envelope:
        return Envelope(kind=kind, sender=self.daemon.node_id, body=body, ce=self.ce, epoch=self.epoch)

    async def send(self, node: str, kind: str, body: dict[str, Any]) -> None:
        assert self.bus is not None
        await self.bus.publish(topic(self.grid, self.ce, "w", node), self._env(kind, body))

    async def _on_coord_message(self, _topic: str, env: Envelope) -> None:
        if env.ce != self.ce or (env.epoch is not None and env.epoch > self.epoch):
            return
        if self._done.is_set():
            return
        self.last_seen[env.sender] = time.monotonic()
        try:
            await self._handle(env)
        except BusError as e:
            # Our answer (tasks, acks) is lost with the bus. Back on it, we ask every worker to say
            # hello again: it resends its results, and the tasks it lacks run again (`worker_back`).
            log.debug("CE %s: could not answer a %s from %s: %s", self.ce, env.kind, env.sender[:8], e)

    async def _handle(self, env: Envelope) -> None:
        node = env.sender
        if env.kind == "hello":
            await self._worker_hello(node, env)
        elif env.kind == "hb":
            if node not in self.dispatch.workers and node not in self.recruited:
                await self.send(node, "release", {"reason": "not a member of this CE"})
        elif env.kind == "rep-ack":
            refused = env.body.get("refused")
            if isinstance(refused, str):  # its disk is full, say
                if self.replication.refused(node, refused[:500]):
                    await self._rename_replicas()
            else:
                self.replication.on_ack(node, int(env.body.get("seq", 0)))
        elif env.kind == "bye" and self.state == "finishing":
            self.dispatch.remove_worker(node)
            self._worker_left.set()
        elif env.kind in ("bye", "lost"):
            if env.kind == "lost" and env.nonce != self.sessions.get(node):
                return  # the will (its nonce is the bus session) of an older connection of a worker
            await self.worker_lost(node, "left the CE" if env.kind == "bye" else "connection lost")
        elif self.half is not None:
            await self.half.on_message(env)

    async def _worker_hello(self, node: str, env: Envelope) -> None:
        slots = int(env.body.get("slots", 1))
        back = node in self.dispatch.workers  # a member saying hello again, after one side lost the bus
        self.recruited.pop(node, None)
        self.sessions[node] = str(env.body.get("session", ""))
        self.dispatch.add_worker(node, max(1, slots))
        # After a failover a worker reattaches with the tasks it is still running: they stay its own.
        reported = {i for i in env.body.get("running") or [] if isinstance(i, int) and 0 <= i < len(self.job.tasks)}
        # Only tasks still waiting here: one already done (or failed) must not look running again.
        for index in reported & (set(self.dispatch.fresh) | set(self.dispatch.retry)):
            self.dispatch.claim(index, node)
        # Tasks our journal gives it but it does not have (their offer died with the old coordinator):
        # once its resent results had time to arrive, whatever is still unaccounted for runs again.
        orphans = {i for i, n in self.dispatch.running.items() if n == node} - reported
        assert self.half is not None
        if orphans and self.resume:
            self.requeue_orphans_later(node, orphans)
        elif back:  # the backend decides: a Condor or BOINC worker does not list what its middleware runs
            await self.half.worker_back(node, reported)
        self.workers_seen.add(node)
        log.info("CE %s: worker %s %s with %d slot(s)", self.ce, node[:8], "is back" if back else "joined", slots)
        await self._rename_replicas()
        await self.half.worker_joined(node, slots)

    def requeue_orphans_later(self, node: str, orphans: set[int]) -> None:
        """Tasks given to `node` that it says it does not have run again, unless their results arrive
        first (a worker resends its results right after its hello)."""
        self._tasks.append(asyncio.ensure_future(self._requeue_orphans(node, orphans)))

    async def _requeue_orphans(self, node: str, orphans: set[int], delay: float = 2.0) -> None:
        await asyncio.sleep(delay)
        lost = [i for i in sorted(orphans) if self.dispatch.running.get(i) == node]
        if not lost or self.journal is None:
            return
        journal, job_id = self.journal, self.job_id

        def requeue() -> None:
            with journal.batch():
                for i in lost:
                    journal.requeue(job_id, i, "its worker never received it (lost with a coordinator or a link)")

        with contextlib.suppress(JournalWriteError):  # given again all the same: see worker_lost
            await self._journal_write(requeue)
        for i in lost:
            self.dispatch.requeue(i)
        log.warning("CE %s: %d task(s) %s never received run again", self.ce, len(lost), node[:8])
        self.replication.wake.set()
        assert self.half is not None
        await self.half.tasks_requeued()

    async def _rename_replicas(self) -> None:
        # By default one replica, from the second worker on; once named, kept when the CE shrinks
        # to one worker, so that the journal (and the job's end) stays on a second disk.
        default = 1 if len(self.dispatch.workers) >= 2 or self.replication.replicas else 0
        k = self.job.replicas if self.job.replicas is not None else default
        # never ourselves: a replica of the coordinator on the coordinator's own disk protects nothing
        others = [w for w in self.dispatch.workers if w != self.daemon.node_id]
        if self.replication.rename(others, k):
            log.info("CE %s: replicas %s", self.ce, [r[:8] for r in self.replication.replicas])
            if self.bus and self.bus.connected:
                await self.bus.publish(topic(self.grid, self.ce, "all"), self._env("replicas", self._membership()))

    def _membership(self) -> dict[str, Any]:
        """In every heartbeat: the lease, the replicas' ranks, and the workers a replica asks before taking over."""
        return {"lease": self.lease_s, "replicas": list(self.replication.replicas),
                "timeout": self.failover_timeout_s, "workers": list(self.dispatch.workers)[:MEMBERS_LISTED]}

    async def worker_lost(self, node: str, reason: str) -> None:
        if node not in self.dispatch.workers:
            return
        lost = self.dispatch.remove_worker(node)
        self.last_seen.pop(node, None)
        self._worker_left.set()
        if self.journal and lost:
            journal = self.journal
            # If refused, the journal still shows them on the lost node; marking one running on
            # another node requeues it there first (_mark_running), so they run again all the same.
            with contextlib.suppress(JournalWriteError):
                await self._journal_write(lambda: journal.requeue_node(self.job_id, node, reason))
        log.warning("CE %s: worker %s lost (%s); %d task(s) requeued", self.ce, node[:8], reason, len(lost))
        await self.sync_journal()  # its copy of the results it ran is gone: ours must hold
        await self._rename_replicas()
        assert self.half is not None
        await self.half.worker_lost(node, lost)
        await self._check_settled()

    async def release_worker(self, node: str, reason: str) -> None:
        """Give a worker back to its owner/the grid (the CE shrinks)."""
        # It forgets its results once released: they must be on our disk first.
        if not await self.sync_journal():
            return  # the disk refuses writes: keep it, and its results, until the next try
        if node in self.dispatch.workers and not self.dispatch.workers[node].running:
            self.dispatch.remove_worker(node)
            log.info("CE %s: releasing worker %s (%s)", self.ce, node[:8], reason)
            await self.send(node, "release", {"reason": reason})
            await self._rename_replicas()

    # ---------------------------------------------------------------- loops --

    async def _heartbeat_loop(self) -> None:
        assert self.bus is not None
        last_turn = last_sync = time.monotonic()
        while True:
            if time.monotonic() - last_turn > self.worker_timeout_s / 2:
                # This process was stopped (suspended, swapping): the workers' silence was ours, and
                # what they sent meanwhile may not be read yet.
                log.warning("CE %s: the coordinator stalled for %.1fs", self.ce, time.monotonic() - last_turn)
                self._not_their_silence()
            last_turn = time.monotonic()
            try:
                await self.bus.publish(topic(self.grid, self.ce, "all"), self._env("hb", self._membership()), qos=0)
                now = self.last_beat = time.monotonic()
                silent = [n for n in self.dispatch.workers if now - self.last_seen.get(n, now) > self.worker_timeout_s]
                for node in silent:
                    await self.worker_lost(node, f"silent for {self.worker_timeout_s:g}s")
                if self._owed and self.half:  # tasks the journal refused to mark running: try again
                    self._owed = False
                    await self.half.tasks_requeued()
                if now - last_sync >= SYNC_EVERY_S and (self._syncing is None or self._syncing.done()):
                    last_sync = now  # in its own task: a slow disk's fsync must not delay the heartbeats
                    self._syncing = asyncio.ensure_future(self.sync_journal())
            except BusError as e:  # the bus said it lost the broker; the replicas may take over
                log.debug("CE %s: no heartbeat: %s", self.ce, e)
            except Exception:
                log.exception("CE %s: heartbeat failed", self.ce)
            await asyncio.sleep(self.failover_timeout_s / 4)

    def _not_their_silence(self) -> None:
        now = time.monotonic()
        for node in self.dispatch.workers:
            self.last_seen[node] = now

    def _bus_lost(self, reason: str) -> None:
        """Our own broker connection dropped (a stall past its keepalive, say): connect again. With
        no replica to take over, nobody else would finish the job."""
        if self.state == "running" and not self.stepped_down and (self._reconnecting is None
                                                                  or self._reconnecting.done()):
            self._reconnecting = asyncio.ensure_future(self._reconnect_bus(reason))
            self._tasks.append(self._reconnecting)

    async def _reconnect_bus(self, reason: str) -> None:
        assert self.bus is not None
        lost_at = time.monotonic()
        while self.state == "running" and not self.stepped_down and not self.bus.connected:
            await asyncio.sleep(RECONNECT_EVERY_S)
            try:
                await self.bus.connect()
            except BusError as e:
                log.debug("CE %s: cannot reach the bus again yet: %s", self.ce, e)
                await self._restart_dead_broker()
                continue
            log.warning("CE %s: back on the bus after %.1fs (%s); the workers resend what may be lost",
                        self.ce, time.monotonic() - lost_at, reason)
            self._not_their_silence()
            with contextlib.suppress(BusError):  # lost again: the next disconnect starts over
                await self.bus.publish(topic(self.grid, self.ce, "all"), self._env("resync", {}))

    async def _restart_dead_broker(self) -> None:
        """Our broker died (the OOM killer, say). With a replica, the replica takes over, as for any
        coordinator nobody hears; with none, nobody would: start another on the same port, where
        every member connects again on its own."""
        old = self.broker
        if old is None or old.alive() or self.replication.replicas:
            return
        try:
            self.broker = await start_ce_broker(self.daemon.config.ce_broker, self.address,
                                                username=self._bus_auth[0], password=self._bus_auth[1],
                                                log_file=self.dir / "broker.log", port=old.port)
        except BrokerError as e:  # its port taken meanwhile, say
            if self._say_broker():
                log.warning("CE %s: the CE's broker died and cannot be started again yet: %s", self.ce, e)
            return
        await asyncio.to_thread(old.stop)  # its temp files
        log.warning("CE %s: the CE's broker died (exit code %s): started another on port %d", self.ce,
                    old.proc.returncode, old.port)

    async def _recruit_loop(self) -> None:
        while not self._done.is_set() and self.state == "running":
            try:
                await self._recruit_once()
            except Exception:
                log.exception("CE %s: recruitment round failed", self.ce)
            await asyncio.sleep(RECRUIT_EVERY_S)

    def superseded_by(self) -> str | None:
        """A coordinator of this CE, over mDNS, with a claim that wins over ours (we were cut off and replaced)."""
        for rec in self.daemon.view.coordinators_of(self.ce):
            if supersedes(rec.ann.epoch or 0, rec.ann.node_id, self.epoch, self.daemon.node_id):
                return rec.ann.node_id
        return None

    async def _successor_by_asking(self) -> str | None:
        """Cut off from all our workers: did one of them take over (and maybe already finish), or
        work for whoever did? Each remembers the newest epoch of its last CEs (`NodeState.known`)."""
        for node in sorted(self.workers_seen - {self.daemon.node_id}):
            rec = self.daemon.view.nodes.get(node)
            if rec is None or not rec.addresses:
                continue
            try:
                reply = await request(rec.addresses[0], rec.port, self.key, self.grid,
                                      Envelope("epoch", self.daemon.node_id, {"ce": self.ce}), timeout=1.0)
                moved_to = self._successor_in(reply.body)
            except Exception:
                continue
            if moved_to is not None:
                return moved_to
        return None

    def _successor_in(self, known: Any) -> str | None:
        """The node that coordinates our CE with a claim over ours, from an `epoch` answer."""
        if not isinstance(known, dict) or not known.get("coordinator"):
            return None
        epoch, by = int(known["epoch"]), str(known["coordinator"])
        return by if supersedes(epoch, by, self.epoch, self.daemon.node_id) else None

    def _named(self, node: str) -> str:
        rec = self.daemon.view.nodes.get(node)
        return f"{rec.ann.host} ({node[:8]})" if rec else node[:8]

    async def step_down(self, successor: str) -> None:
        """Leave the CE to its successor (a node id) without touching the job: no release, no final state."""
        async with self._lock:
            if self._done.is_set():
                return
            log.warning("CE %s: %s coordinates it now (a higher epoch than our %s): stepping down", self.ce,
                        self._named(successor), self.epoch)
            self.stepped_down = True
            self.state = "moved"
            self.message = f"coordinated by {self._named(successor)} since our epoch {self.epoch}"
            me = asyncio.current_task()
            for t in self._tasks:
                if t is not me:
                    t.cancel()
            await self._teardown()
            if self.on_finish:
                await self.on_finish(self)
            self._write_summary()
            self._done.set()

    async def _recruit_once(self) -> None:
        now = time.monotonic()
        moved_to = self._moved_to or self.superseded_by()  # told by a node we asked to join, or over mDNS
        if moved_to is None and not self.dispatch.workers and self.workers_seen \
                and now - self._last_probe > 2 * self.failover_timeout_s:
            self._last_probe = now
            moved_to = await self._successor_by_asking()
        if moved_to is not None:
            await self.step_down(moved_to)
            return
        for node in self.dispatch.idle_workers(keep=self.replication.replicas):
            if self.half is None or not self.half.wants(node):
                await self.release_worker(node, "no tasks left for it")
        # accepted but never said hello: give up on them after the worker timeout
        for node, at in list(self.recruited.items()):
            if now - at > self.worker_timeout_s * 2:
                del self.recruited[node]
        queue_wants = self.dispatch.workers_wanted(self.job.workers_max)
        wanted = max(queue_wants, self.half.workers_needed() - len(self.recruited) if self.half else 0)
        if self.job.workers_max is not None:
            wanted = min(wanted, self.job.workers_max - len(self.dispatch.workers) - len(self.recruited))
        anns = [r.ann for r in self.daemon.view.nodes.values()]
        if wanted > 0:
            exclude = set(self.dispatch.workers) | set(self.recruited) | {self.daemon.node_id}
            exclude |= {n for n, at in self.refused.items() if now - at < REFUSED_BACKOFF_S}
            picks, slots = [], 0
            for ann in recruitable(anns, self.needs, exclude):
                if queue_wants <= 0 and self.half is not None and not self.half.wants(ann.node_id):
                    continue  # recruited for the middleware's own need: only a node it can use
                if slots >= wanted:
                    break
                picks.append(ann)
                slots += max(ann.free_slots, 1)
            if picks:
                await asyncio.gather(*(self._recruit(a.node_id) for a in picks))
        if not self.dispatch.workers and not self.recruited:
            others = [a for a in anns if a.node_id != self.daemon.node_id]
            matching = [a for a in others if self.needs.why_not(a) is None]
            if matching:  # they exist but are busy elsewhere: wait for one, like a queued HTCondor job
                self.message = f"waiting for an idle node: {len(matching)} matching node(s) busy in other CEs"
            elif not self.workers_seen and time.time() - self.started_at > NO_MATCH_GRACE_S:
                self.message = "nobody can run this job: " + explain_no_match(others, self.needs)
                await self._finish("failed")
        elif self.message.startswith("waiting for an idle node"):
            self.message = ""

    async def _recruit(self, node: str) -> None:
        rec = self.daemon.view.nodes.get(node)
        if rec is None or not rec.addresses:
            return
        body = {"ce": self.ce, "coordinator": self.daemon.node_id, "lease": self.lease_s, "bus": self.bus_url,
                "data": self.data.url if self.data else None, "config": self.worker_config}
        try:
            reply = await request(rec.addresses[0], rec.port, self.key, self.grid,
                                  Envelope("recruit", self.daemon.node_id, body, ce=self.ce, epoch=self.epoch),
                                  timeout=3.0)
        except (TimeoutError, OSError, Exception) as e:
            log.info("CE %s: could not recruit %s: %s", self.ce, rec.ann.host, e)
            self.refused[node] = time.monotonic()
            return
        if reply.body.get("accepted"):
            self.recruited[node] = time.monotonic()
            log.info("CE %s: recruited %s (%s)", self.ce, rec.ann.host, node[:8])
            return
        self.refused[node] = time.monotonic()
        log.info("CE %s: %s refused: %s", self.ce, rec.ann.host, reply.body.get("reason"))
        with contextlib.suppress(TypeError, ValueError):
            self._moved_to = self._successor_in(reply.body.get("moved_to")) or self._moved_to

    # -------------------------------------------------------------- results --

    async def assign(self, node: str, n: int) -> list[tuple[int, int]]:
        """Take tasks for `node` (n more asked, see `Dispatch.take`) and mark them running; returns (index, attempt).

        A task the journal shows finished is skipped and asked for again: a worker must get what it
        asked for while tasks wait, or it waits for them forever.
        """
        out: list[tuple[int, int]] = []
        ask = n
        while True:
            picked = self.dispatch.take(node, ask)
            if not picked:
                break
            try:
                got = await self._mark_running(node, picked)
            except JournalWriteError:  # still asked for: given once the journal takes writes again
                self.dispatch.give_back(node, picked)
                self._owed = True
                break
            out += got
            ask = len(picked) - len(got)  # the skipped ones were not given
            if ask == 0:
                break
        if out:
            self.replication.wake.set()
            if self.first_task_at is None:
                self.first_task_at = time.time()
        return out

    async def _mark_running(self, node: str, picked: list[int]) -> list[tuple[int, int]]:
        assert self.journal is not None
        journal, job_id, now = self.journal, self.job_id, time.time()

        def mark() -> tuple[list[tuple[int, int]], list[int]]:
            settled = []
            with journal.batch(durable=False):  # a lost "running" costs nothing: workers report theirs
                out, refused = journal.mark_running_many(job_id, picked, node, now)
                for i, state in refused.items():
                    if state != "running":
                        settled.append(i)  # already done or failed for good
                        continue
                    # After a failover the journal may still show it on a worker that is gone.
                    journal.requeue(job_id, i, "reassigned after a failover")
                    out.append((i, journal.mark_running(job_id, i, node, now)))
            return out, settled

        out, settled = await self._journal_write(mark, inline=True)
        for i in settled:  # on the event loop: the dispatch is not shared with threads
            self.dispatch.finish(i)
        return out

    async def task_started(self, index: int, node: str) -> int:
        """For backends whose middleware places tasks itself: task `index` started on `node`.

        Returns the attempt number to report its result with (`accept_results`).
        """
        assert self.journal is not None
        self.dispatch.claim(index, node)
        attempt = await asyncio.to_thread(self.journal.mark_running, self.job_id, index, node, time.time())
        self.replication.wake.set()  # a successor must know who holds the task
        if self.first_task_at is None:
            self.first_task_at = time.time()
        return attempt

    async def grant_waiting(self) -> dict[str, list[tuple[int, int]]]:
        """Hand requeued tasks to workers that asked for work earlier and got none."""
        grants = {}
        for node, w in list(self.dispatch.workers.items()):
            if w.waiting and self.dispatch.pending:
                got = await self.assign(node, 0)
                if got:
                    grants[node] = got
        return grants

    async def accept_results(self, node: str, items: list[dict[str, Any]], *,
                             durable: bool = True) -> list[list[int]]:
        """Record results (exactly once) and return the (index, attempt) pairs to acknowledge.

        `durable=False` acknowledges them once committed, before they are synced to disk: for a
        backend whose workers keep every result until they are released (the native one). A
        crash of this process loses nothing; a power cut loses at most what was not yet synced,
        which its worker sends again to whoever coordinates next. `sync_journal` runs before any
        worker is let go, and every SYNC_EVERY_S.
        """
        assert self.journal is not None
        prepared = []
        for item in items:
            try:
                index, attempt = int(item["index"]), int(item["attempt"])
                if not 0 <= index < len(self.job.tasks):
                    raise ValueError(f"no task {index}")
                record = self._record(node, item)
                ok = item.get("ok") is True
                if ok and item.get("outputs"):
                    await asyncio.to_thread(self._store_outputs, index, attempt, item)
                prepared.append((index, attempt, ok, record))
            except OSError as e:  # a full disk, say: not acknowledged, so its worker sends it again
                self._storage_refused(f"cannot store the outputs of task {item.get('index')}: {e}")
            except (KeyError, ValueError, TypeError) as e:
                log.warning("CE %s: dropping a bad result from %s: %s", self.ce, node[:8], e)
        journal, job_id, max_failures = self.journal, self.job_id, self.job.retries + 1

        def record_all() -> list[tuple[int, bool, FailureOutcome | None]]:
            out: list[tuple[int, bool, FailureOutcome | None]] = []
            successes: list[tuple[int, ResultRecord]] = []

            def flush() -> None:  # runs of successes are one change each; the order of the items is kept
                stored = journal.record_results(job_id, successes)
                out.extend((index, ok, None) for (index, _), ok in zip(successes, stored, strict=True))
                successes.clear()

            with journal.batch(durable=durable):
                for index, _attempt, ok, record in prepared:
                    if ok:
                        successes.append((index, record))
                        continue
                    if successes:
                        flush()
                    out.append((index, False, journal.record_failure(job_id, index, record,
                                                                     max_failures=max_failures)))
                if successes:
                    flush()
            return out

        try:
            outcomes = await self._journal_write(record_all, inline=not durable)
        except JournalWriteError:
            return []  # nothing recorded, nothing acknowledged: the workers send them again
        self.replication.wake.set()
        requeued = False
        for index, recorded, failure in outcomes:
            if recorded:
                self.last_result_at = time.time()
                if self.resume and not self._first_result_logged:
                    self._first_result_logged = True
                    log.warning("CE %s: first result accepted after the takeover (epoch %d)", self.ce, self.epoch)
                self.counts["done"] += 1
                self.dispatch.finish(index)
            elif failure is FailureOutcome.REQUEUED:
                self.dispatch.requeue(index)
                requeued = True
            elif failure is FailureOutcome.FAILED:
                self.counts["failed"] += 1
                self.dispatch.finish(index)
                log.info("CE %s: task %d failed for good after %d attempt(s)", self.ce, index, max_failures)
            elif self.dispatch.running.get(index) == node:
                self.dispatch.finish(index)  # duplicate or stale report: the slot is free all the same
        if requeued and self.half:
            await self.half.tasks_requeued()
        await self._check_settled()
        return [[i, a] for i, a, _, _ in prepared]

    async def sync_journal(self) -> bool:
        """Make the results committed without an fsync durable; False if the disk refused."""
        journal = self.journal
        if journal is None or not journal.unsynced:
            return True
        try:
            await self._journal_write(journal.sync)
        except JournalWriteError:
            return False
        except JournalError as e:  # closed under us: the CE is being torn down
            log.debug("CE %s: journal not synced: %s", self.ce, e)
            return False
        return True

    async def _journal_write(self, write: Callable[[], _T], *, inline: bool = False) -> _T:
        """A journal write, off the event loop; the caller keeps what a refused one could not record.

        `inline`: a write without fsync, on the event loop unless another thread holds the journal.
        It takes well under a millisecond, and the two thread hand-offs saved are most of a
        result's way from its message to its acknowledgement.
        """
        try:
            out = _BUSY if not inline or self.journal is None else self.journal.run_if_free(write, _BUSY)
            if out is _BUSY:
                out = await asyncio.to_thread(write)
        except JournalWriteError as e:
            self._storage_refused(str(e))
            raise
        if self.storage_error is not None:
            self.storage_error = None
            if self._storage_recovery_owed:
                log.warning("CE %s: the journal can be written again", self.ce)
                self._storage_recovery_owed = False
        return out

    def _storage_refused(self, problem: str) -> None:
        """Shown in the job's status until a journal write succeeds; logged at most once a minute
        (a nearly full disk takes small writes and refuses big ones, and workers resend every 3 s)."""
        self.storage_error = problem
        if self._say_storage():
            self._storage_recovery_owed = True
            log.error("CE %s: %s; the job waits, its results kept by the workers, until it can be written",
                      self.ce, problem)

    def _record(self, node: str, item: dict[str, Any]) -> ResultRecord:
        outs = tuple(OutputFile.from_dict(o) for o in item.get("outputs", ()))
        code = item.get("exit_code")
        return ResultRecord(
            exit_code=-1 if code is None else int(code),
            started_at=float(item.get("started_at", 0.0)),
            finished_at=float(item.get("ended_at", 0.0)),
            node_id=node,
            attempt=int(item["attempt"]),
            stdout=base64.b64decode(item.get("stdout", "")),
            stderr=base64.b64decode(item.get("stderr", "")),
            outputs=outs,
            extra={k: item[k] for k in ("error", "timed_out", "stdout_truncated", "stderr_truncated") if item.get(k)},
        )

    def _store_outputs(self, index: int, attempt: int, item: dict[str, Any]) -> None:
        """Put a successful attempt's files in place (inline ones written, uploaded ones moved), checked by sha256."""
        dest_root = self.dir / "outputs" / str(index)
        staged = self.dir / "staging" / f"{index}-{attempt}"
        inline = item.get("inline") or {}
        for o in item.get("outputs", ()):
            rel, sha = str(o["path"]), str(o["sha256"])
            dest = safe_join(dest_root, rel)
            dest.parent.mkdir(parents=True, exist_ok=True)
            if rel in inline:
                data = base64.b64decode(inline[rel])
                if hashlib.sha256(data).hexdigest() != sha:
                    raise ValueError(f"inline output {rel} does not match its sha256")
                tmp = dest.with_name(dest.name + ".part")
                tmp.write_bytes(data)
                os.replace(tmp, dest)
            else:
                src = safe_join(staged, rel)
                if not src.is_file():
                    if dest.is_file() and sha256_file(dest) == sha:
                        continue  # a resent result whose file we already moved
                    raise ValueError(f"output {rel} was never uploaded")
                if sha256_file(src) != sha:
                    raise ValueError(f"uploaded output {rel} does not match its sha256")
                os.replace(src, dest)
        shutil.rmtree(staged, ignore_errors=True)

    async def _check_settled(self) -> None:
        if self.state == "running" and self.dispatch.pending == 0 and not self.dispatch.running \
                and self._finisher is None:
            # In its own task: we may be inside a bus handler, and finishing waits for the
            # workers' goodbyes, which arrive through that same handler.
            self._finisher = asyncio.ensure_future(self._finish("failed" if self.counts["failed"] else "done"))

    # ---------------------------------------------------------------- status --

    def status(self) -> dict[str, Any]:
        end = self.finished_at or time.time()
        elapsed = end - self.started_at
        done, failed = self.counts["done"], self.counts["failed"]
        return {
            "job": self.job_id,
            "name": self.job.name,
            "epoch": self.epoch,
            "ce": self.ce,
            "backend": self.job.backend,
            "state": self.state,
            "message": self.storage_error or self.message,
            "tasks_total": len(self.job.tasks),
            "tasks_done": done,
            "tasks_failed": failed,
            "tasks_running": len(self.dispatch.running),
            "tasks_pending": self.dispatch.pending,
            "workers": len(self.dispatch.workers),
            "workers_used": len(self.workers_seen),
            "submitted_at": round(self.submitted_at or self.started_at, 3),
            "seconds": round(elapsed, 3),
            "tasks_per_second": round((done + failed) / elapsed, 2) if elapsed > 0 else 0.0,
            "first_task_after": round(self.first_task_at - self.started_at, 4) if self.first_task_at else None,
            "last_result_after": round(self.last_result_at - self.started_at, 4) if self.last_result_at else None,
        }

    def _write_summary(self) -> None:
        try:
            replace_file(self.dir / STATUS_FILE, json.dumps(self.status()))
        except OSError as e:  # a full disk: the journal has the end; the job must still end
            log.error("CE %s: cannot write %s: %s", self.ce, self.dir / STATUS_FILE, e)


async def _until(done: Callable[[], bool], changed: asyncio.Event, timeout: float) -> bool:
    """Wait until `done()`, looked at again each time `changed` is set; False after `timeout`."""
    deadline = time.monotonic() + timeout
    while not done():
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        changed.clear()
        with contextlib.suppress(TimeoutError):  # and every 0.1 s all the same: a missed signal costs no more
            await asyncio.wait_for(changed.wait(), min(left, 0.1))
    return True
