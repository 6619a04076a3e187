"""Who coordinates a CE after its coordinator disappears: failure detection and re-election (sans-I/O).

Every worker of a CE runs one `Election`. Heartbeats of the coordinator keep it
quiet. When they stop for `timeout` (or the bus connection drops and they then
stay away), the CE's replicas take over in rank order: rank r tries at
`last heartbeat + r x timeout`, so rank 1 goes first and rank 2 only if rank 1
did not show up with a higher epoch in the meantime. Everybody else waits to
see a coordinator of a higher epoch and reattaches to it, or gives the node
back after the lease when nobody comes (no orphans).

Epochs fence: a heartbeat, or a coordinator seen, with an epoch lower than the
one we follow is ignored, so a deposed coordinator that comes back is never
obeyed again. Rank r takes over with epoch `old + r`, so two replicas of one
coordinator never claim the same epoch; should two claims ever meet with equal
epochs (a successor that failed in turn while a slow replica of its
predecessor woke up), the claim order `(epoch, node id)` decides, everywhere
the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class TakeOver:
    """This node becomes the coordinator, with this epoch."""

    epoch: int


@dataclass(frozen=True)
class Reattach:
    """Follow a (new) coordinator."""

    coordinator: str
    epoch: int
    bus: str | None
    data: str | None


@dataclass(frozen=True)
class GiveUp:
    """Nobody took over within the lease: the node goes back to Idle."""


Action = TakeOver | Reattach | GiveUp


def supersedes(epoch: int, node: str, than_epoch: int, than_node: str) -> bool:
    """Does the claim (epoch, node) win over (than_epoch, than_node)? One total order for everybody."""
    return (epoch, node) > (than_epoch, than_node)


@dataclass
class Election:
    me: str
    ce: str
    epoch: int
    coordinator: str
    timeout: float
    lease: float
    last_heartbeat: float
    replicas: tuple[str, ...] = ()
    bus: str | None = None
    data: str | None = None
    done: bool = False  # took over or gave up: this election has nothing more to say
    _tried: set[int] = field(default_factory=set)

    @property
    def rank(self) -> int | None:
        """1-based replica rank of this node, None if it is not a replica."""
        return self.replicas.index(self.me) + 1 if self.me in self.replicas else None

    def heartbeat(self, epoch: int, coordinator: str, now: float,
                  replicas: tuple[str, ...] | None = None) -> list[Action]:
        """A heartbeat (or any message) from a coordinator of this CE."""
        if self.done or supersedes(self.epoch, self.coordinator, epoch, coordinator):
            return []
        actions: list[Action] = []
        if (epoch, coordinator) != (self.epoch, self.coordinator):
            actions.append(Reattach(coordinator, epoch, self.bus, self.data))
        self.epoch, self.coordinator, self.last_heartbeat = epoch, coordinator, max(self.last_heartbeat, now)
        if replicas is not None:
            self.replicas = replicas
        return actions

    def coordinator_seen(self, epoch: int, coordinator: str, bus: str | None, data: str | None,
                         now: float) -> list[Action]:
        """A Coordinator service of this CE announced over mDNS."""
        if self.done or coordinator == self.me or not supersedes(epoch, coordinator, self.epoch, self.coordinator):
            return []
        self.epoch, self.coordinator, self.bus, self.data = epoch, coordinator, bus, data
        self.last_heartbeat = now  # a fresh coordinator: give it a full timeout to start beating
        return [Reattach(coordinator, epoch, bus, data)]

    def tick(self, now: float) -> list[Action]:
        if self.done:
            return []
        silent = now - self.last_heartbeat
        rank = self.rank
        if rank is not None and silent >= rank * self.timeout and self.epoch not in self._tried:
            self._tried.add(self.epoch)
            self.done = True
            return [TakeOver(self.epoch + rank)]
        if silent >= self.lease:
            self.done = True
            return [GiveUp()]
        return []
