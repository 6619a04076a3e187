"""A computing element, worker side: membership, lease, failover; the backend's worker half does the work.

Started by the node daemon when it accepts a recruit request, stopped when
the node leaves the CE (release, lease expiry, owner, shutdown). It watches the
coordinator (heartbeats on the bus, Coordinator services over mDNS) through a
sans-I/O `Election`: it reattaches to a successor, takes over itself when it is
the replica whose turn it is and its peers confirm the coordinator is gone for
them too (`peers`), or gives the node back when nobody comes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import backend as backends
from . import nodestate as ns
from . import peers
from .bus import RECONNECT_EVERY_S, Bus, BusError, bus_credentials, topic
from .datasrv import StorageError
from .election import AskPeers, Election, GiveUp, Hold, Reattach, TakeOver
from .envelope import Envelope
from .journal import JournalWriteError
from .ratelimit import Sometimes
from .replication import ReplicaStore

if TYPE_CHECKING:
    from .node import NodeDaemon

log = logging.getLogger("bonjourgrid.worker")

HEARTBEAT_S = 1.0
TICK_S = 0.05


class WorkerCE:
    def __init__(self, daemon: NodeDaemon, ce: str, epoch: int, coordinator: str, lease_s: float,
                 bus_url: str, data_url: str | None, config: dict[str, Any]) -> None:
        self.daemon = daemon
        self.ce = ce
        self.epoch = epoch
        self.coordinator = coordinator
        self.lease_s = lease_s
        self.bus_url = bus_url
        self.data_url = data_url
        self.config = config
        self.grid = daemon.config.grid
        self.key = daemon.config.key
        self.node_id = daemon.node_id
        self.dir: Path = daemon.config.state_dir / "work" / ce
        self.bus: Bus | None = None
        self.half: backends.WorkerHalf | None = None
        self.election = Election(self.node_id, ce, epoch, coordinator, float(config.get("failover_timeout", 1.0)),
                                 lease_s, time.monotonic())
        self.replica = ReplicaStore(daemon.config.state_dir / "ces" / ce, self.key, ce)
        self.released = False
        self.ended = False  # released at the end of the job (not alone, as the CE shrank)
        self._released_at: float | None = None
        self._task: asyncio.Task[None] | None = None
        self._asking: asyncio.Task[None] | None = None
        self._say_refused = Sometimes()  # a full disk refuses every batch, resent every 2 s
        self._reconnecting: asyncio.Task[None] | None = None
        self._connect_lock = asyncio.Lock()  # a reconnect and a reattach must not build two buses

    # ------------------------------------------------------------ lifecycle --

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._run())

    async def stop(self) -> None:
        for task in (self._asking, self._reconnecting):
            if task is not None:
                task.cancel()
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task

    async def _run(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        half_task = None
        try:
            self.half = backends.load(self.config.get("backend", "native")).worker(self)
            await self._connect()
            log.info("CE %s: working for %s with %d slot(s)", self.ce, self.coordinator[:8], self.slots)
            half_task = asyncio.ensure_future(self.half.run())
            next_beat = 0.0
            while not self.released:
                if half_task.done():
                    half_task.result()  # surface a crash of the backend
                    break
                now = time.monotonic()
                if now >= next_beat and self.bus is not None and self.bus.connected:
                    next_beat = now + HEARTBEAT_S
                    with contextlib.suppress(BusError):
                        await self.publish("hb", {}, qos=0)
                await self._act(self.election.tick(now) + self._coordinators_seen(now))
                await asyncio.sleep(TICK_S)
        except asyncio.CancelledError:
            pass
        except Exception:
            log.exception("CE %s: the worker failed", self.ce)
        finally:
            for task in (self._asking, self._reconnecting):
                if task is not None:
                    task.cancel()
            if half_task is not None:
                half_task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await half_task
            if self.bus is not None:
                with contextlib.suppress(Exception):
                    if self.bus.connected:
                        await self.publish("bye", {})
                    await self.bus.close()  # connected or not: its handler tasks end with it
            await asyncio.to_thread(self.replica.close)
            shutil.rmtree(self.dir, ignore_errors=True)
            e = self.election
            if e.claimed is None:  # a replica that took over answers as the coordinator instead
                if not self.ended or self.node_id not in e.replicas:  # our copy stopped short of the end
                    await asyncio.to_thread(self.replica.abandon, time.time())
                peers.remember_left(self.daemon, self.ce, peers.LeftCE(
                    e.epoch, e.coordinator, self._released_at or e.last_heartbeat, self.ended))
            if self.daemon.worker is self:
                self.daemon.worker = None
            if not self.daemon.stopping:
                # The worker ended on its own (crash, nobody took over): hand the node back.
                await self.daemon.feed(ns.Release(self.ce, self.epoch))

    async def _connect(self) -> None:
        """(Re)connect to the current coordinator's bus and say hello."""
        async with self._connect_lock:
            await self._connect_now()

    async def _connect_now(self) -> None:
        if self.bus is not None:
            with contextlib.suppress(Exception):
                await self.bus.close()
        user, password = bus_credentials(self.key, self.grid, self.ce)
        if not self.config.get("bus_auth", True):
            user = password = None  # the CE runs on an external broker, used anonymously
        will = (topic(self.grid, self.ce, "coord"), self.envelope("lost", {}))
        self.bus = Bus(self.bus_url, self.key, self.grid, f"w-{self.node_id}-{self.ce}"[:64], will=will,
                       username=user, password=password, keepalive=2)
        await self.bus.subscribe(topic(self.grid, self.ce, "w", self.node_id), self._on_message)
        await self.bus.subscribe(topic(self.grid, self.ce, "all"), self._on_message)
        await self.bus.connect()
        self.bus.on_disconnect = self._bus_lost
        await self._hello()

    async def _hello(self) -> None:
        """Join, or say again what we hold: the coordinator reruns what it gave us and we lack."""
        assert self.bus is not None
        running = await self.half.running() if self.half is not None else []
        await self.publish("hello", {"slots": self.slots, "session": self.bus.session, "running": running})

    # ------------------------------------------------------------- failover --

    def _coordinators_seen(self, now: float) -> list[Any]:
        actions: list[Any] = []
        for rec in self.daemon.view.coordinators_of(self.ce):
            a = rec.ann
            # A takeover first claims the role, then announces its bus: follow it once it can be reached.
            if a.bus and a.epoch is not None:
                actions += self.election.coordinator_seen(a.epoch, a.node_id, a.bus, a.data, now)
        return actions

    async def _act(self, actions: list[Any]) -> None:
        for action in actions:
            if isinstance(action, Reattach):
                await self._reattach(action)
            elif isinstance(action, TakeOver):
                log.warning("CE %s: coordinator %s silent: taking over with epoch %d", self.ce,
                            self.coordinator[:8], action.epoch)
                # The replica journal is the successor's now; our tasks keep running and we keep
                # working, for ourselves once the new CE is up (`follow`).
                await asyncio.to_thread(self.replica.close)
                self.daemon.spawn(self.daemon.take_over(self.ce, action.epoch, self.election.replicas))
            elif isinstance(action, AskPeers):
                self._asking = asyncio.ensure_future(self._ask_peers(action))
            elif isinstance(action, Hold):
                log.warning("CE %s: coordinator %s silent, not taking over: %s", self.ce, self.coordinator[:8],
                            action.reason)
                if action.alive:
                    self._bus_lost("the others still hear the coordinator")
            elif isinstance(action, GiveUp):
                log.warning("CE %s: %s: leaving the CE", self.ce,
                            action.reason or f"no coordinator for {self.lease_s:g}s")
                self.ended = action.ended
                await self.daemon.feed(ns.Release(self.ce, self.epoch))

    async def _ask_peers(self, ask: AskPeers) -> None:
        """Does the coordinator look gone to the others too? The election decides from the answers."""
        timeout, t0 = self.election.timeout / 2, time.monotonic()
        try:
            out = await peers.ask(self.daemon, self.ce, self.election.coordinator, ask.peers, timeout,
                                  self.election.wants_coordinator)
        except Exception:  # never leave the election waiting: an ask that failed is an ask nobody answered
            log.exception("CE %s: asking the peers failed", self.ce)
            out = peers.Outcome((), len(ask.peers), 0, 0)
        log.info("CE %s: asked %d peer(s) and %d other node(s) about %s in %.0f ms: %s; %d other(s) reached",
                 self.ce, out.asked, out.others_asked, self.election.coordinator[:8], (time.monotonic() - t0) * 1000,
                 [(a.node[:8], a.epoch, a.silent) for a in out.answers], out.others_reached)
        await self._act(self.election.peers_answered(ask.epoch, out.answers, out.asked, time.monotonic(),
                                                     out.others_asked, out.others_reached))

    def _bus_lost(self, reason: str) -> None:
        """Connect again on our own: a worker that is not a replica asks nobody, and would otherwise
        wait out its lease while its coordinator, and its tasks, wait for it."""
        if (self.bus is None or not self.bus.connected) and not self.released \
                and (self._reconnecting is None or self._reconnecting.done()):
            self._reconnecting = asyncio.ensure_future(self._reconnect(reason))

    async def _reconnect(self, reason: str) -> None:
        lost_at = time.monotonic()
        while not self.released and not self.election.done and (self.bus is None or not self.bus.connected):
            await asyncio.sleep(RECONNECT_EVERY_S)
            try:
                async with self._connect_lock:
                    if self.bus is not None and self.bus.connected:
                        return  # a reattach connected us meanwhile
                    await self._connect_now()
            except BusError as e:
                log.debug("CE %s: cannot reach the coordinator's bus again yet: %s", self.ce, e)
                continue
            log.warning("CE %s: back on the bus of coordinator %s after %.1fs (%s)", self.ce, self.coordinator[:8],
                        time.monotonic() - lost_at, reason)
            if self.half is not None:
                await self.half.resumed()

    async def follow(self, coordinator: str, epoch: int, bus: str, data: str | None) -> None:
        """Follow a coordinator named directly (this very node, after it took over)."""
        await self._reattach(Reattach(coordinator, epoch, bus, data))

    async def _reattach(self, r: Reattach) -> None:
        log.warning("CE %s: following coordinator %s (epoch %d)", self.ce, r.coordinator[:8], r.epoch)
        self.coordinator, self.epoch = r.coordinator, r.epoch
        await self.daemon.feed(ns.RenewLease(self.ce, r.epoch, self.lease_s, time.monotonic(), r.coordinator))
        if r.bus and r.bus != self.bus_url:
            self.bus_url, self.data_url = r.bus, r.data or self.data_url
            try:
                await self._connect()
            except BusError as e:
                log.warning("CE %s: cannot reach the new coordinator's bus yet: %s", self.ce, e)
                return
        if self.half is not None:
            await self.half.reattached()

    # -------------------------------------------------------------- helpers --

    @property
    def slots(self) -> int:
        per_task = max(int(self.config.get("cpus", 1)), 1)
        return max(self.daemon.config.cpus // per_task, 1)

    def envelope(self, kind: str, body: dict[str, Any]) -> Envelope:
        return Envelope(kind=kind, sender=self.node_id, body=body, ce=self.ce, epoch=self.epoch)

    async def publish(self, kind: str, body: dict[str, Any], qos: int = 1) -> None:
        """Raises BusError while the coordinator is unreachable (between a failure and a reattach)."""
        if self.bus is None:
            raise BusError("not connected")
        await self.bus.publish(topic(self.grid, self.ce, "coord"), self.envelope(kind, body), qos=qos)

    async def _on_message(self, _topic: str, env: Envelope) -> None:
        if env.ce != self.ce or env.epoch is None:
            return
        now = time.monotonic()
        if env.kind in ("hb", "replicas"):
            replicas = tuple(str(r) for r in env.body.get("replicas") or ())
            workers = env.body.get("workers")
            members = tuple(str(w) for w in workers) if isinstance(workers, list) else None
            await self._act(self.election.heartbeat(env.epoch, env.sender, now, replicas=replicas, workers=members))
            if (env.sender, env.epoch) == (self.coordinator, self.epoch):
                await self.daemon.feed(ns.RenewLease(self.ce, self.epoch,
                                                     float(env.body.get("lease", self.lease_s)), now))
            return
        if (env.sender, env.epoch) != (self.coordinator, self.epoch):
            log.warning("CE %s: refused a %s from %s at epoch %s (following %s at epoch %s)", self.ce, env.kind,
                        env.sender[:8], env.epoch, self.coordinator[:8], self.epoch)
            return
        if env.kind == "release":
            log.info("CE %s: released (%s)", self.ce, env.body.get("reason") or env.body.get("state", ""))
            self.released, self.ended, self._released_at = True, "state" in env.body, now
            await self.daemon.feed(ns.Release(self.ce, self.epoch))
        elif env.kind == "rep":
            await self._replicate(env.body)
        elif env.kind == "resync":  # the coordinator was off the bus: what we sent meanwhile may be lost
            log.info("CE %s: the coordinator is back on the bus: saying hello again", self.ce)
            with contextlib.suppress(BusError):
                await self._hello()
            if self.half is not None:
                await self.half.resumed()
        elif self.half is not None:
            await self.half.on_message(env)

    async def _replicate(self, body: dict[str, Any]) -> None:
        try:
            seq = await asyncio.to_thread(self.replica.apply, body, self.data_url)
        except (JournalWriteError, StorageError, OSError) as e:  # our disk is full, say: not the batch's fault
            if self._say_refused():
                log.warning("CE %s: cannot store replicated changes: %s (said again at most once a minute)",
                            self.ce, e)
            with contextlib.suppress(BusError):  # so that the coordinator names another replica if it can
                await self.publish("rep-ack", {"refused": str(e)})
            return
        except Exception as e:  # a bad batch: say nothing, the coordinator resends from our last ack
            log.warning("CE %s: could not apply replicated changes: %s", self.ce, e)
            return
        with contextlib.suppress(BusError):
            await self.publish("rep-ack", {"seq": seq})
