"""A computing element, worker side: membership, lease, heartbeats; the backend's worker half does the work.

Started by the node daemon when it accepts a recruit request, stopped when
the node leaves the CE (release, lease expiry, owner, shutdown).
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
from .bus import Bus, BusError, bus_credentials, topic
from .envelope import Envelope

if TYPE_CHECKING:
    from .node import NodeDaemon

log = logging.getLogger("bonjourgrid.worker")

HEARTBEAT_S = 1.0


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
        self._task: asyncio.Task[None] | None = None

    # ------------------------------------------------------------ lifecycle --

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._run())

    async def stop(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task

    async def _run(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        user, password = bus_credentials(self.key, self.grid, self.ce)
        if not self.config.get("bus_auth", True):
            user = password = None  # the CE runs on an external broker, used anonymously
        will = (topic(self.grid, self.ce, "coord"), self.envelope("lost", {}))
        self.bus = Bus(self.bus_url, self.key, self.grid, f"w-{self.node_id}-{self.ce}"[:64], will=will,
                       username=user, password=password, keepalive=2)
        half_task = None
        try:
            self.half = backends.load(self.config.get("backend", "native")).worker(self)
            await self.bus.connect()
            self.bus.on_disconnect = lambda reason: log.warning("CE %s: bus lost: %s", self.ce, reason)
            await self.bus.subscribe(topic(self.grid, self.ce, "w", self.node_id), self._on_message)
            await self.bus.subscribe(topic(self.grid, self.ce, "all"), self._on_message)
            await self.publish("hello", {"slots": self.slots, "session": self.bus.session})
            log.info("CE %s: working for %s with %d slot(s)", self.ce, self.coordinator[:8], self.slots)
            half_task = asyncio.ensure_future(self.half.run())
            while True:
                if half_task.done():
                    half_task.result()  # surface a crash of the backend
                    break
                with contextlib.suppress(BusError):
                    await self.publish("hb", {}, qos=0)
                await asyncio.sleep(HEARTBEAT_S)
        except asyncio.CancelledError:
            pass
        except Exception:
            log.exception("CE %s: the worker failed", self.ce)
        finally:
            if half_task is not None:
                half_task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await half_task
            if self.bus is not None and self.bus.connected:
                with contextlib.suppress(Exception):
                    await self.publish("bye", {})
                    await self.bus.close()
            shutil.rmtree(self.dir, ignore_errors=True)
            # If the worker ended on its own (crash, bus gone), hand the node back.
            if not self.daemon.stopping:
                await self.daemon.feed(ns.Release(self.ce, self.epoch))

    # -------------------------------------------------------------- helpers --

    @property
    def slots(self) -> int:
        per_task = max(int(self.config.get("cpus", 1)), 1)
        return max(self.daemon.config.cpus // per_task, 1)

    def envelope(self, kind: str, body: dict[str, Any]) -> Envelope:
        return Envelope(kind=kind, sender=self.node_id, body=body, ce=self.ce, epoch=self.epoch)

    async def publish(self, kind: str, body: dict[str, Any], qos: int = 1) -> None:
        assert self.bus is not None
        await self.bus.publish(topic(self.grid, self.ce, "coord"), self.envelope(kind, body), qos=qos)

    async def _on_message(self, _topic: str, env: Envelope) -> None:
        if env.ce != self.ce or env.sender != self.coordinator:
            return
        if env.epoch is not None and env.epoch < self.epoch:
            log.warning("CE %s: refused a message of stale epoch %s < %s", self.ce, env.epoch, self.epoch)
            return
        if env.kind == "hb":
            await self.daemon.feed(ns.RenewLease(self.ce, self.epoch, float(env.body.get("lease", self.lease_s)),
                                                 time.monotonic()))
        elif env.kind == "release":
            log.info("CE %s: released (%s)", self.ce, env.body.get("reason") or env.body.get("state", ""))
            await self.daemon.feed(ns.Release(self.ce, self.epoch))
        elif self.half is not None:
            await self.half.on_message(env)
