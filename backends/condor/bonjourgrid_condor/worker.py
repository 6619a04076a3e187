"""Worker half: a startd joining the CE's pool, sized from what the node lends, for as long as the node is in the CE."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil

from bonjourgrid.backend import WorkerHalf
from bonjourgrid.envelope import Envelope
from bonjourgrid.gridkey import GridKey
from bonjourgrid.worker import WorkerCE

from . import config as cfg
from .daemons import Master, write_password

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
        (local / "owner.ad").write_text(cfg.owner_ad(self._owner_busy()))
        (local / "condor_config").write_text(cfg.worker_config(
            local, str(bc["collector"]), node.addresses[0], int(bc["port"]), local / "passwords.d",
            cpus=w.slots * per_task, memory_mib=int(node.memory_mib), node_id=w.node_id))
        master = Master(local / "condor_config", local, local / "master.out")
        try:
            await master.start()
            busy = None
            while True:  # keep the startd's view of the owner current (START/SUSPEND policy)
                now = self._owner_busy()
                if now != busy:
                    busy = now
                    tmp = local / "owner.ad.tmp"
                    tmp.write_text(cfg.owner_ad(now))
                    tmp.replace(local / "owner.ad")
                if not master.alive:
                    log.warning("CE %s: condor_master exited; see %s", w.ce, local / "master.out")
                    return
                await asyncio.sleep(OWNER_POLL_S)
        finally:
            with contextlib.suppress(Exception):
                await asyncio.shield(master.stop())
            shutil.rmtree(local, ignore_errors=True)

    def _owner_busy(self) -> bool:
        return bool(self.worker.daemon.machine.state.owner_busy)

    async def on_message(self, env: Envelope) -> None:
        """Tasks reach this node through Condor, not the bus: nothing to do."""
