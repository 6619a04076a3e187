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

    async def run(self) -> None:
        w = self.worker
        bc = w.config.get("backend_config") or {}
        node = w.daemon.config
        local = w.dir / "condor"
        local.mkdir(parents=True, exist_ok=True)
        for sub in ("log", "spool", "execute", "lock", "run"):
            (local / sub).mkdir(exist_ok=True)
        write_password(local / "passwords.d", pool_secret(w.key, w.ce))
        per_task = max(int(w.config.get("cpus", 1)), 1)
        busy = self._owner_busy()
        (local / "owner.config").write_text(cfg.owner_config(busy))
        (local / "condor_config").write_text(cfg.worker_config(
            local, str(bc["collector"]), node.addresses[0], int(bc["port"]), local / "passwords.d",
            cpus=w.slots * per_task, memory_mib=int(node.memory_mib), node_id=w.node_id))
        master = Master(local / "condor_config", local, local / "master.out")
        try:
            await master.start()
            while True:  # keep the startd's view of the owner current (START/SUSPEND policy)
                now = self._owner_busy()
                if now != busy:
                    await self._set_owner(local, now)
                    busy = now
                if not master.alive:
                    log.warning("CE %s: condor_master exited; see %s", w.ce, local / "master.out")
                    return
                await asyncio.sleep(OWNER_POLL_S)
        finally:
            with contextlib.suppress(Exception):
                await asyncio.shield(master.stop())
            shutil.rmtree(local, ignore_errors=True)

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
        """Tasks reach this node through Condor, not the bus: nothing to do."""
