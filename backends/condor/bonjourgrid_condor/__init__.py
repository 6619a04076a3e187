"""HTCondor backend for BonjourGrid: each computing element gets its own, closed, Condor pool.

See docs/backends/condor.md.
"""

from __future__ import annotations

from bonjourgrid.backend import Backend, CoordinatorHalf, WorkerHalf
from bonjourgrid.coordinator import CoordinatorCE
from bonjourgrid.worker import WorkerCE

from .coordinator import CondorCoordinator
from .worker import CondorWorker

__all__ = ["CondorBackend"]


class CondorBackend(Backend):
    name = "condor"
    description = "HTCondor: a central manager and schedd on the coordinator, a startd on each worker"

    def coordinator(self, ce: CoordinatorCE) -> CoordinatorHalf:
        return CondorCoordinator(ce)

    def worker(self, worker: WorkerCE) -> WorkerHalf:
        return CondorWorker(worker)
