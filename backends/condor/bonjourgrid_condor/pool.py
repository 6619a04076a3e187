"""The `htcondor2` bindings, serialised on one thread: submit, remove, read the job event log.

The bindings read their configuration from CONDOR_CONFIG, a process-wide setting; a node
coordinates at most one CE at a time, so the node daemon's process points it at that CE's
client configuration while the CE lives.
"""

from __future__ import annotations

import asyncio
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import htcondor2


class Pool:
    def __init__(self, client_config: Path, collector: str, event_log: Path) -> None:
        self.client_config = client_config
        self.collector = collector
        self.event_log = event_log
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="condor")
        self._schedd: htcondor2.Schedd | None = None
        self._events: Any = None

    async def call(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def configure(self) -> None:
        os.environ["CONDOR_CONFIG"] = str(self.client_config)
        htcondor2.reload_config()

    def schedd(self) -> htcondor2.Schedd:
        if self._schedd is None:
            ad = htcondor2.Collector(self.collector).locate(htcondor2.DaemonType.Schedd)
            self._schedd = htcondor2.Schedd(ad)
        return self._schedd

    def startds(self) -> list[dict[str, Any]]:
        ads = htcondor2.Collector(self.collector).query(htcondor2.AdType.Startd, projection=["Machine", "BgNode"])
        return [dict(a) for a in ads]

    def submit(self, description: dict[str, str], items: list[dict[str, str]]) -> int:
        res = self.schedd().submit(htcondor2.Submit(description), itemdata=iter(items))
        return res.cluster()

    def remove(self, constraint: str, reason: str) -> None:
        self.schedd().act(htcondor2.JobAction.Remove, constraint, reason)

    def new_events(self) -> list[tuple[str, int, int, float, dict[str, Any]]]:
        """Events appended to the log since the last call: (type, cluster, proc, time, attributes)."""
        if self._events is None:
            if not self.event_log.exists():
                return []
            self._events = htcondor2.JobEventLog(str(self.event_log))
        return [(e.type.name, e.cluster, e.proc, float(e.timestamp), dict(e.items()))
                for e in self._events.events(stop_after=0)]

    def close(self) -> None:
        if self._events is not None:
            self._events.close()
            self._events = None
        self._pool.shutdown(wait=False)
