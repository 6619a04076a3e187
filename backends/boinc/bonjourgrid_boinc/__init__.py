"""BonjourGrid's BOINC backend: the coordinator serves a BOINC project itself; unmodified clients compute."""

from __future__ import annotations

from typing import TYPE_CHECKING

from bonjourgrid.backend import Backend, CoordinatorHalf, WorkerHalf

if TYPE_CHECKING:
    from bonjourgrid.coordinator import CoordinatorCE
    from bonjourgrid.worker import WorkerCE


class BoincBackend(Backend):
    name = "boinc"
    description = "unmodified BOINC clients (Debian boinc-client) attached to a project the coordinator serves"

    def coordinator(self, ce: CoordinatorCE) -> CoordinatorHalf:
        from .coordinator import BoincCoordinator

        return BoincCoordinator(ce)

    def worker(self, worker: WorkerCE) -> WorkerHalf:
        from .worker import BoincWorker

        return BoincWorker(worker)
