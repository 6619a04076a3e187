"""Backends: how a computing element runs its tasks (plugins, entry-point group `bonjourgrid.backends`).

Every backend has two halves. The coordinator half lives in the CE on the
submitting node: it hands tasks to the middleware and reports what happened
through the CE (`ce.accept_result`, `ce.task_failed`, ...), which owns the
journal, recruitment, heartbeats and release. The worker half lives on each
recruited node for the CE's lifetime. The two halves talk over the CE bus
(native), or through the middleware's own daemons (HTCondor, BOINC): the CE
core does not care which.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any

from .envelope import Envelope

if TYPE_CHECKING:
    from .coordinator import CoordinatorCE
    from .worker import WorkerCE

GROUP = "bonjourgrid.backends"


class BackendError(Exception):
    pass


class CoordinatorHalf:
    """Hooks the CE calls; each does nothing unless a backend needs it."""

    def __init__(self, ce: CoordinatorCE) -> None:
        self.ce = ce

    async def start(self) -> dict[str, Any]:
        """Start what the middleware needs; return the config sent to each recruited worker."""
        return {}

    async def worker_joined(self, node_id: str, slots: int) -> None:
        """A recruited worker said hello (it is ready for work)."""

    async def worker_back(self, node_id: str, running: set[int]) -> None:
        """A worker already in the CE said hello again, with the tasks it holds: one side lost the bus
        for a while, and messages sent meanwhile may be lost (tasks offered to it, say)."""

    async def worker_lost(self, node_id: str, requeued: list[int]) -> None:
        """A worker vanished; the CE already put its running tasks back in the queue."""

    async def tasks_requeued(self) -> None:
        """Tasks went back to the queue (retry, lost worker): hand them out again."""

    async def on_message(self, env: Envelope) -> None:
        """A message for this backend on the coordinator's bus topic."""

    def wants(self, node_id: str) -> bool:
        """The middleware has work this node could take that the core's queue does not show.

        Such a worker is not released when the queue runs dry, and such a node may be recruited for
        `workers_needed`.
        """
        return False

    def workers_needed(self) -> int:
        """Workers the middleware needs beyond what the core's queue asks for (recruited as well)."""
        return 0

    async def cancel(self) -> None:
        """Stop running tasks: the job was cancelled."""

    async def stop(self) -> None:
        """Tear down what `start` built."""


class WorkerHalf(ABC):
    def __init__(self, worker: WorkerCE) -> None:
        self.worker = worker

    @abstractmethod
    async def run(self) -> None:
        """Work for the CE until cancelled (release, lease expiry, shutdown)."""

    @abstractmethod
    async def on_message(self, env: Envelope) -> None:
        """A message from the coordinator for this backend."""

    async def running(self) -> list[int]:
        """Tasks this half still holds: a new coordinator leaves them to us (told in our hello)."""
        return []

    async def reattached(self) -> None:
        """The worker follows a new coordinator."""
        return None  # nothing to redo unless the backend says so

    async def resumed(self) -> None:
        """The same coordinator, after one side lost the bus for a while: messages may be lost."""
        await self.reattached()


class Backend(ABC):
    name: str
    description: str = ""

    @abstractmethod
    def coordinator(self, ce: CoordinatorCE) -> CoordinatorHalf: ...

    @abstractmethod
    def worker(self, worker: WorkerCE) -> WorkerHalf: ...


def available() -> dict[str, str]:
    """name -> 'module:object' of every installed backend."""
    return {ep.name: ep.value for ep in entry_points(group=GROUP)}


def load(name: str) -> Backend:
    for ep in entry_points(group=GROUP):
        if ep.name == name:
            try:
                obj = ep.load()
            except Exception as e:  # a broken plugin must not take the node down
                raise BackendError(f"backend {name!r} failed to load: {e}") from e
            backend = obj() if isinstance(obj, type) else obj
            if not isinstance(backend, Backend):
                raise BackendError(f"backend {name!r} ({ep.value}) is not a bonjourgrid Backend")
            return backend
    known = ", ".join(sorted(available())) or "none"
    raise BackendError(f"no backend named {name!r} is installed (installed: {known})")
