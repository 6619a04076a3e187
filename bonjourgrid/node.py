"""The node daemon: carries out what the state machine decides (asyncio, zeroconf, psutil).

Nothing here decides a transition: events (owner load, control requests,
timers, signals) are fed to `NodeMachine`, and its actions are executed in
order. That keeps this file about I/O only.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import os
import platform
import secrets
import shutil
import signal
import socket
import sys
import time
import warnings
from collections import OrderedDict
from collections.abc import Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import jobs, retention
from . import nodestate as ns
from .announcement import HOST_RE, Announcement, Role
from .envelope import BadMessage, Envelope, Opener, seal
from .execution import Executor
from .gridkey import GridKey
from .gridview import GridView, NodeRecord
from .jobqueue import JobQueue
from .localnode import NODE_FILE
from .mdns import Browser, Publisher, open_zeroconf
from .ownerpolicy import OwnerMonitor, OwnerPolicy
from .peers import HeardRequestError, LeftCE, answer_heard
from .resources import AnnounceThrottle, ResourceProbe, Resources, ThrottlePolicy
from .wire import frame, read_frame
from .worker import WorkerCE

if TYPE_CHECKING:
    from .coordinator import CoordinatorCE

log = logging.getLogger("bonjourgrid.node")



@dataclass
class NodeConfig:
    grid: str
    key: GridKey
    state_dir: Path
    addresses: list[str]
    cpus: int
    memory_mib: int
    caps: tuple[str, ...] = ()
    owner: OwnerPolicy = field(default_factory=OwnerPolicy)
    throttle: ThrottlePolicy = field(default_factory=ThrottlePolicy)
    sample_interval: float = 2.0
    port: int = 0
    host: str = field(default_factory=lambda: safe_hostname(socket.gethostname()))
    broker_url: str | None = None  # external MQTT broker for the CEs this node coordinates
    ce_broker: str = "auto"  # else, the broker each CE starts: auto (Mosquitto if installed), mosquitto, amqtt
    lease_s: float = 30.0  # workers of our CEs go back to Idle after this long without us
    failover_timeout_s: float = 1.0  # our workers suspect us after this long without a heartbeat
    keep_copies_s: float = retention.DEFAULT_KEEP_S  # other jobs' leftovers on our disk (0: keep forever)
    task_nice: int = 10  # grid tasks give way to the owner's programs at once, before the owner policy acts
    run_queue: bool = True  # start the jobs queued here; `submit`'s temporary node, there for one job, does not


def safe_hostname(name: str) -> str:
    """The host label as announced: DNS-safe, short."""
    label = "".join(c if c.isalnum() or c in "-_." else "-" for c in name.split(".")[0])[:63] or "node"
    return label if HOST_RE.match(label) else f"n{label}"[:63]


def use_pidfd_child_watcher() -> None:
    """Python 3.11 waits for each task process with a new thread; a pidfd costs far less (3.12+ does this itself)."""
    if sys.version_info >= (3, 12) or not hasattr(asyncio, "PidfdChildWatcher"):
        return
    try:
        os.close(os.pidfd_open(os.getpid()))
    except (AttributeError, OSError):
        return  # kernel without pidfd_open
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        watcher = asyncio.PidfdChildWatcher()
        watcher.attach_loop(asyncio.get_running_loop())
        asyncio.set_child_watcher(watcher)


MAX_STATUS_WAIT_S = 5.0  # a `job` request waits at most this long for the end (the client's timeout is longer)
GC_THRESHOLDS = (10_000, 10, 10)  # Python's are (700, 10, 10)


def tune_gc() -> None:
    """Collect cycles less often, and never walk what start-up built (modules, zeroconf, the loop).

    Every task makes a handful of short-lived dicts and lists (JSON, envelopes), so at the
    default threshold the collector ran every few tasks, and its older generations, which hold
    every long-lived object, every few hundred. With this, in 8 runs of a 2,000-task job against
    8 without, alternated, the coordinator and the workers each used about a fifth less user
    CPU per task, and the steady rate rose by a fifth to a quarter. Objects frozen here live as long as the daemon
    anyway; cyclic garbage is still collected, only in larger batches.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def load_node_id(state_dir: Path) -> str:
    """Created once, then kept: the node's identity across restarts."""
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = state_dir / "node-id"
    try:
        node_id = path.read_text().strip()
        if len(node_id) == 16 and all(c in "0123456789abcdef" for c in node_id):
            return node_id
        log.warning("%s is corrupt; creating a new node id", path)
    except FileNotFoundError:
        pass
    node_id = secrets.token_hex(8)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(node_id + "\n")
    os.replace(tmp, path)
    return node_id


KNOWN_FILE = "known-ces.json"


def load_known_ces(state_dir: Path) -> tuple[tuple[str, int, str], ...]:
    """The newest epoch and coordinator of the CEs this node last worked for, kept across restarts.

    A coordinator frozen while this daemon restarted must still hear that its CE moved on, or it
    runs the rest of its job again on this desktop (architecture.md §7, remembered epochs)."""
    path = state_dir / KNOWN_FILE
    try:
        entries = json.loads(path.read_text())
        known = tuple((ce, epoch, by) for ce, epoch, by in entries
                      if isinstance(ce, str) and type(epoch) is int and isinstance(by, str))
    except FileNotFoundError:
        return ()
    except (OSError, ValueError, TypeError) as e:
        log.warning("%s is unreadable (%s): the epochs of earlier CEs are forgotten", path, e)
        return ()
    if len(known) != len(entries):
        log.warning("%s: dropped %d malformed entries", path, len(entries) - len(known))
    return known


def save_known_ces(state_dir: Path, known: tuple[tuple[str, int, str], ...]) -> None:
    path = state_dir / KNOWN_FILE
    tmp = path.with_suffix(".tmp")
    try:
        tmp.write_text(json.dumps([list(k) for k in known]))
        os.replace(tmp, path)
    except OSError as e:  # a full disk: remembered until the daemon stops, as before
        log.warning("could not keep the epochs of earlier CEs in %s: %s", path, e)


class NodeDaemon:
    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        self.node_id = load_node_id(config.state_dir)
        self.machine = ns.NodeMachine(self.node_id, load_known_ces(config.state_dir))
        self.view = GridView(config.grid, config.key)
        self.monitor = OwnerMonitor(config.owner)
        self.probe = ResourceProbe(config.cpus, config.memory_mib)
        self.throttle = AnnounceThrottle(config.throttle, config.memory_mib)
        self.opener = Opener(config.key, config.grid)
        self.resources = Resources(config.cpus, config.memory_mib, 0.0)
        self.busy_slots = 0
        self._stop = asyncio.Event()
        self.stopping = False
        self._background: set[asyncio.Task[Any]] = set()
        self.ces: dict[str, CoordinatorCE] = {}  # CEs this node coordinates or coordinated
        self.queue = JobQueue(jobs.ces_dir(self))  # jobs submitted here, waiting for the CE here to end
        self.jobs_lock = asyncio.Lock()  # one decision at a time: start a job, or queue it
        self.worker: WorkerCE | None = None
        self._executor: Executor | None = None
        self.left_ces: OrderedDict[str, LeftCE] = OrderedDict()  # how we left recent CEs (for `heard`)
        self._publisher: Publisher | None = None
        self._server: asyncio.Server | None = None
        self.port = config.port

    # -- lifecycle ----------------------------------------------------------

    def task_executor(self) -> Executor:
        """The node's task executor, shared by its CEs one after the other (warm spawners, one docker client)."""
        if self._executor is None:
            self._executor = Executor(task_nice=self.config.task_nice)
        return self._executor

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        """Run in the background, keeping a reference until it ends (asyncio holds only weak ones)."""
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def take_over(self, ce: str, epoch: int, replicas: tuple[str, ...] = ()) -> None:
        """Coordinate `ce` from our replica of its journal; our worker half goes on working for it."""
        coordinator = await jobs.take_over(self, ce, epoch, replicas)
        if self.worker is None or self.worker.ce != ce:
            return
        if coordinator is None:
            self.worker.released = True  # no CE to work for
        else:
            await self.worker.follow(self.node_id, coordinator.epoch, coordinator.bus_url,
                                     coordinator.data.url if coordinator.data else None)

    def request_stop(self) -> None:
        self._stop.set()

    async def run(self, handle_signals: bool = True) -> None:
        cfg = self.config
        use_pidfd_child_watcher()
        azc = open_zeroconf(cfg.addresses)
        # One IPv4 socket on every interface: with port 0, separate sockets
        # would each get a different port, and only one can be announced.
        self._server = await asyncio.start_server(self._serve_client, host="0.0.0.0", port=cfg.port)
        self.port = self._server.sockets[0].getsockname()[1]
        self._publisher = Publisher(azc, cfg.key, cfg.addresses, self.port)
        browser = Browser(azc, self.view, self._on_view_change)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM) if handle_signals else ():
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self.request_stop)
        node_file = cfg.state_dir / NODE_FILE
        try:
            self.resources, _ = self.probe.sample(time.monotonic())
            if self.monitor.observe(time.monotonic(), 0.0, self._free_disk()):  # out before it is ever seen
                log.warning("the owner needs this machine (%s): not lending it", self.monitor.reason)
                await self.feed(ns.OwnerBusy())
            await self._execute(self.machine.start())
            self.throttle.announced(self.resources, time.monotonic())
            await browser.start()
            self._write_node_file(node_file)
            log.info(
                "node %s (%s) up on %s, control port %d, grid %r, lending %d cpus / %d MiB",
                self.node_id, cfg.host, ", ".join(cfg.addresses), self.port, cfg.grid, cfg.cpus, cfg.memory_mib,
            )
            if cfg.run_queue:
                self.queue.load()
                self.spawn(jobs.start_queued(self))
            sampler = asyncio.ensure_future(self._sample_forever())
            pruner = asyncio.ensure_future(self._prune_forever())
            tune_gc()
            await self._stop.wait()
            sampler.cancel()
            pruner.cancel()
            self.stopping = True
            for ce in list(self.ces.values()):
                await ce.cancel("the coordinator's node daemon stopped")
                await ce.servers_stopped()
            log.info("stopping: withdrawing the service")
            await self._execute(self.machine.handle(ns.Shutdown()))
        finally:
            if self._executor is not None:
                self._executor.close()  # its spawners kill whatever still runs
            with contextlib.suppress(FileNotFoundError):
                node_file.unlink()
            await browser.stop()
            self._server.close()
            await azc.async_close()

    def _write_node_file(self, path: Path) -> None:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"node_id": self.node_id, "pid": os.getpid(), "port": self.port,
                                   "grid": self.config.grid}))
        os.replace(tmp, path)

    # -- events in ------------------------------------------------------------

    async def feed(self, event: ns.Event) -> list[ns.Action]:
        known = self.machine.state.known
        actions = self.machine.handle(event)
        if self.machine.state.known != known:  # a CE joined, or moved to a new epoch or coordinator
            save_known_ces(self.config.state_dir, self.machine.state.known)
        await self._execute(actions)
        return actions

    async def _sample_forever(self) -> None:
        while True:
            await asyncio.sleep(self.config.sample_interval)
            try:
                await self._sample_once()
            except Exception:  # a probe hiccup must not stop the node
                log.exception("resource sampling failed")

    async def _prune_forever(self) -> None:
        """Other jobs' leftovers (replica copies, exports, work directories) go after keep_copies_s."""
        keep = self.config.keep_copies_s
        while keep > 0:
            busy = set(self.ces) | ({self.worker.ce} if self.worker is not None else set())
            try:
                await asyncio.to_thread(retention.prune, self.config.state_dir, busy, keep, time.time())
            except Exception:  # a clean-up hiccup must not stop the node
                log.exception("cleaning up old copies failed")
            await asyncio.sleep(retention.PRUNE_EVERY_S)

    def _free_disk(self) -> int | None:
        """Free bytes where tasks run and write (the owner policy's disk reserve)."""
        try:
            return shutil.disk_usage(self.config.state_dir).free
        except OSError:
            return None

    async def _sample_once(self) -> None:
        now = time.monotonic()
        self.resources, owner_cpu = self.probe.sample(now, self.busy_slots)
        verdict = self.monitor.observe(now, owner_cpu, self._free_disk())
        if verdict is True:
            log.warning("the owner needs this machine (%s): leaving the grid", self.monitor.reason)
            await self.feed(ns.OwnerBusy())
        elif verdict is False:
            log.info("the owner's use is low again (%s): offering this node", self.monitor.reason)
            await self.feed(ns.OwnerFree())
        await self.feed(ns.Tick(now))
        if self.throttle.should_announce(self.resources, now):
            await self.feed(ns.ResourcesChanged())

    def _on_view_change(self, what: str, rec: NodeRecord | None) -> None:
        if rec is not None:
            a = rec.ann
            log.info("grid: %s %s (%s) %s%s", what, a.host, a.node_id[:8], a.role.value,
                     f" of CE {a.ce}" if a.ce else "")

    # -- actions out ----------------------------------------------------------

    async def _execute(self, actions: list[ns.Action]) -> None:
        assert self._publisher is not None
        for action in actions:
            match action:
                case ns.Publish():
                    await self._publisher.publish(self._announcement(action))
                    self.throttle.announced(self.resources, time.monotonic())
                    log.info("now %s%s", action.role.value, f" of CE {action.ce}" if action.ce else "")
                case ns.RefreshResources():
                    svc = self.machine.state.service()
                    if svc is not None:
                        await self._publisher.publish(self._announcement(svc))
                        self.throttle.announced(self.resources, time.monotonic())
                case ns.Withdraw():
                    await self._publisher.withdraw()
                    log.info("service withdrawn")
                case ns.Stopped():
                    await self._publisher.flush()
                case ns.LeftCE(ce=ce, reason=reason):
                    log.info("left CE %s: %s", ce, reason)
                    self._stop_working_for(ce)
                case ns.OwnerReclaims(ce=ce):
                    # Give the tasks back (their CE reruns them elsewhere, no failure counted), as
                    # HTCondor vacates a job when the owner returns. The worker's end then feeds
                    # Release, and the owner-busy node goes quiet until its owner is done.
                    log.info("the owner needs this machine: leaving CE %s", ce)
                    self._stop_working_for(ce)
                case ns.Refused(ce=ce, reason=reason):
                    log.info("refused CE %s: %s", ce, reason)
                case _:
                    log.debug("action %s", action)

    def _stop_working_for(self, ce: str) -> None:
        if self.worker is not None and self.worker.ce == ce:
            worker, self.worker = self.worker, None
            self.spawn(worker.stop())

    def _announcement(self, svc: ns.Publish) -> Announcement:
        cfg, res = self.config, self.resources
        return Announcement(
            grid=cfg.grid,
            node_id=self.node_id,
            host=cfg.host,
            role=svc.role,
            cpus=cfg.cpus,
            memory_mib=cfg.memory_mib,
            free_slots=res.free_slots,
            free_memory_mib=res.free_memory_mib,
            load=res.load,
            os=platform.system().lower() or "unknown",
            arch=platform.machine() or "unknown",
            caps=cfg.caps,
            ce=svc.ce,
            coordinator=svc.coordinator,
            epoch=svc.epoch if svc.role is not Role.IDLE else None,
            bus=svc.bus,
            data=svc.data,
            timestamp_ms=int(time.time() * 1000),
        )

    # -- control channel ------------------------------------------------------

    def status(self) -> dict[str, object]:
        s = self.machine.state
        now = time.time()
        return {
            "id": self.node_id,
            "host": self.config.host,
            "grid": self.config.grid,
            "state": s.role.value,
            "owner_busy": s.owner_busy,
            "owner_reason": self.monitor.reason if s.owner_busy else "",
            "ce": s.ce,
            "epoch": s.epoch,
            "port": self.port,
            "nodes": [r.to_json(now) for r in self.view.sorted_nodes()],
            "ignored": dict(self.view.ignored_summary()),
            "dropped": dict(self.view.dropped),
        }

    async def _serve_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        try:
            while True:
                try:
                    data = await asyncio.wait_for(read_frame(reader), timeout=60)
                except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
                    return
                try:
                    req = self.opener.open(data, time.time())
                except BadMessage as e:
                    log.warning("refused a control message from %s: %s", peer, e)
                    return
                body = await self._answer(req)
                body["re"] = req.nonce
                reply = Envelope(kind=f"{req.kind}.reply", sender=self.node_id, body=body)
                writer.write(frame(seal(self.config.key, self.config.grid, reply, time.time())))
                await writer.drain()
        except BadMessage as e:
            log.warning("dropped a control connection from %s: %s", peer, e)
        except Exception:
            log.exception("control connection from %s failed", peer)
        finally:
            writer.close()

    async def _answer(self, req: Envelope) -> dict[str, object]:
        handler = {
            "status": lambda r: self.status(),
            "recruit": self._on_recruit,
            "submit": self._on_submit,
            "job": self._on_job,
            "epoch": lambda r: self._epoch_of(self.machine.state.newest(str(r.body.get("ce", "")))),
            "jobs": lambda r: {"jobs": jobs.list_jobs(self)},
            "heard": lambda r: answer_heard(self, r.body),
            "cancel": self._on_cancel,
            "export": self._on_export,
            "result_list": lambda r: jobs.result_list(self, str(r.body.get("job", ""))),
            "result_file": lambda r: jobs.result_file(self, str(r.body.get("job", "")), str(r.body.get("path", "")),
                                                      int(r.body.get("offset", 0))),
        }.get(req.kind)
        if handler is None:
            return {"error": f"unknown request {req.kind!r}"}
        try:
            result = handler(req)
            return await result if asyncio.iscoroutine(result) else result
        except (jobs.JobRequestError, HeardRequestError) as e:
            return {"error": str(e)}

    async def _on_recruit(self, req: Envelope) -> dict[str, object]:
        b = req.body
        try:
            ce, lease = str(b["ce"]), float(b["lease"])
            bus, data, config = str(b["bus"]), b.get("data"), dict(b["config"])
        except (KeyError, TypeError, ValueError):
            return {"accepted": False, "reason": "malformed recruit request"}
        if req.epoch is None or req.ce != ce:
            return {"accepted": False, "reason": "a recruit request must carry its CE and epoch"}
        actions = await self.feed(ns.Recruit(ce, req.sender, req.epoch, lease, time.monotonic()))
        for a in actions:
            if isinstance(a, ns.Refused):
                moved = {"moved_to": self._epoch_of(a.moved_to)} if a.moved_to else {}
                return {"accepted": False, "reason": a.reason, **moved}
        if self.worker is None or self.worker.ce != ce:
            self.worker = WorkerCE(self, ce, req.epoch, req.sender, lease, bus, data, config)
            self.worker.start()
        return {"accepted": True, "slots": self.worker.slots}

    def _epoch_of(self, known: tuple[int, str] | None) -> dict[str, object]:
        """The newest epoch and coordinator this node knew of a CE, for a coordinator that may have been replaced."""
        if known is None:
            return {"epoch": 0, "coordinator": None}
        return {"epoch": known[0], "coordinator": known[1] or self.node_id}

    async def _on_submit(self, req: Envelope) -> dict[str, object]:
        return await jobs.submit(self, req.body)

    async def _on_job(self, req: Envelope) -> dict[str, object]:
        """A job's status; with `wait`, not before it ends or that many seconds pass (a long poll).

        `submit` asks this way, so it learns of the end at once rather than at its next poll.
        """
        job, wait = str(req.body.get("job", "")), req.body.get("wait")
        ce = self.ces.get(job)
        if ce is not None and isinstance(wait, int | float) and wait > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(ce.wait(), min(float(wait), MAX_STATUS_WAIT_S))
        return jobs.job_status(self, job)

    async def _on_cancel(self, req: Envelope) -> dict[str, object]:
        return await jobs.cancel(self, str(req.body.get("job", "")))

    async def _on_export(self, req: Envelope) -> dict[str, object]:
        body = req.body
        try:
            after = int(body.get("after", 0))
        except (TypeError, ValueError):
            raise jobs.JobRequestError("`after` must be a mark from an earlier export") from None
        return await jobs.export(self, str(body.get("job", "")), Path(str(body.get("dest", ""))), after,
                                 final=body.get("partial") is not True)
