"""Worker half: a startd joining the CE's pool, sized from what the node lends, for as long as the node is in the CE."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
from pathlib import Path

from bonjourgrid.backend import WorkerHalf
from bonjourgrid.envelope import Envelope
from bonjourgrid.gridkey import GridKey
from bonjourgrid.worker import WorkerCE

from . import config as cfg
from .daemons import Master, run_tool, write_password

log = logging.getLogger("bonjourgrid.condor")

OWNER_POLL_S = 1.0


def pool_secret(key: GridKey, ce: str) -> bytes:
    """The pool password of one CE: only holders of the grid key can compute it."""
    return key.derive("condor-pool/" + ce)


class CondorWorker(WorkerHalf):
    worker: WorkerCE

    def __init__(self, worker: WorkerCE) -> None:
        super().__init__(worker)
        self._moved = asyncio.Event()  # the CE's pool is elsewhere now (failover): rejoin it
        self.collector = ""

    async def run(self) -> None:
        w = self.worker
        bc = w.config.get("backend_config") or {}
        local = w.dir / "condor"
        local.mkdir(parents=True, exist_ok=True)
        for sub in ("log", "spool", "execute", "lock", "run"):
            (local / sub).mkdir(exist_ok=True)
        write_password(local / "passwords.d", pool_secret(w.key, w.ce))
        busy = self._owner_busy()
        (local / "owner.config").write_text(cfg.owner_config(busy))
        self.collector, port = str(bc["collector"]), int(bc["port"])
        master: Master | None = None
        try:
            while True:
                master = await self._start_master(local, self.collector, port)
                while not self._moved.is_set():  # keep the startd's view of the owner current
                    now = self._owner_busy()
                    if now != busy:
                        await self._set_owner(local, now)
                        busy = now
                    if not master.alive:
                        log.warning("CE %s: condor_master exited; see %s", w.ce, local / "master.out")
                        return
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._moved.wait(), OWNER_POLL_S)
                # A successor coordinator built a new pool: its jobs here belonged to the old one
                # (it resubmits every task without a recorded result), so restart toward it.
                self._moved.clear()
                await master.stop()
                log.warning("CE %s: joining the new coordinator's pool at %s", w.ce, self.collector)
        finally:
            if master is not None:
                with contextlib.suppress(Exception):
                    await asyncio.shield(master.stop())
            shutil.rmtree(local, ignore_errors=True)

    async def _start_master(self, local: Path, collector: str, port: int) -> Master:
        w, node = self.worker, self.worker.daemon.config
        per_task = max(int(w.config.get("cpus", 1)), 1)
        (local / "condor_config").write_text(cfg.worker_config(
            local, collector, node.addresses[0], port, local / "passwords.d",
            cpus=w.slots * per_task, memory_mib=int(node.memory_mib), node_id=w.node_id))
        master = Master(local / "condor_config", local, local / "master.out")
        await master.start()
        return master

    async def _set_owner(self, local: Path, busy: bool) -> None:
        tmp = local / "owner.config.tmp"
        tmp.write_text(cfg.owner_config(busy))
        tmp.replace(local / "owner.config")
        try:
            await run_tool(local / "condor_config", local, "condor_reconfig", "-daemon", "startd")
            log.info("CE %s: owner %s: the startd %s", self.worker.ce, "busy" if busy else "away",
                     "suspends its jobs" if busy else "runs jobs again")
        except RuntimeError as e:  # not up yet: it reads the file when it starts
            log.warning("CE %s: could not tell the startd about the owner: %s", self.worker.ce, e)

    def _owner_busy(self) -> bool:
        return bool(self.worker.daemon.machine.state.owner_busy)

    async def on_message(self, env: Envelope) -> None:
        """Tasks reach this node through Condor, not the bus; the coordinator only says where its pool is."""
        collector = env.body.get("collector") if env.kind == "pool" else None
        if isinstance(collector, str) and collector and collector != self.collector:
            self.collector = collector
            self._moved.set()
