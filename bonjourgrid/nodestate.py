"""Every transition of a node, in one sans-I/O state machine.

Events go in, actions come out; there are no sockets, threads or clocks here
(time arrives inside events), so the asyncio daemon and the deterministic
simulator drive exactly the same logic.

A node's role is Idle, Worker or Coordinator. Orthogonal to it is whether the
machine's owner currently needs it (owner policy). The DNS-SD service a node
publishes is a function of both: it is never stored, always derived, so the
"exactly one service" rule cannot drift out of sync with the role.

    role         owner free        owner busy
    idle         Idle service      (nothing: not recruitable)
    worker       Worker service    Worker service until it has left the CE (tasks given back)
    coordinator  Coordinator       Coordinator (a coordinator is light)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

from .announcement import Role

KNOWN_CES = 64

# ---------------------------------------------------------------- events ----


@dataclass(frozen=True)
class OwnerBusy:
    pass


@dataclass(frozen=True)
class OwnerFree:
    pass


@dataclass(frozen=True)
class Recruit:
    """A coordinator asks this node to join its CE (already authenticated by the runtime)."""

    ce: str
    coordinator: str
    epoch: int
    lease_s: float
    now: float


@dataclass(frozen=True)
class RenewLease:
    """A heartbeat of our coordinator, or a new coordinator we follow after a takeover (`coordinator`)."""

    ce: str
    epoch: int
    lease_s: float
    now: float
    coordinator: str | None = None


@dataclass(frozen=True)
class Release:
    ce: str
    epoch: int


@dataclass(frozen=True)
class Coordinate:
    """This node starts (or, after a failover, takes over) the coordination of a CE.

    `preempts`: the job was submitted on this node. A desktop lent to someone else's CE is still
    its owner's: it leaves that CE (whose coordinator runs the tasks elsewhere) in the same step.
    """

    ce: str
    epoch: int
    bus: str | None = None
    data: str | None = None
    preempts: bool = False


@dataclass(frozen=True)
class EndCoordination:
    ce: str


@dataclass(frozen=True)
class Tick:
    now: float


@dataclass(frozen=True)
class ResourcesChanged:
    pass


@dataclass(frozen=True)
class Shutdown:
    pass


Event = (
    OwnerBusy | OwnerFree | Recruit | RenewLease | Release | Coordinate | EndCoordination | Tick
    | ResourcesChanged | Shutdown
)

# --------------------------------------------------------------- actions ----


@dataclass(frozen=True)
class Publish:
    """Make this the node's one service (replacing any other, with a goodbye)."""

    role: Role
    ce: str | None = None
    coordinator: str | None = None
    epoch: int | None = None
    bus: str | None = None
    data: str | None = None


@dataclass(frozen=True)
class Withdraw:
    """Publish nothing (goodbye for the current service)."""


@dataclass(frozen=True)
class RefreshResources:
    """Same service, fresh resource fields."""


@dataclass(frozen=True)
class Accepted:
    ce: str
    epoch: int
    lease_until: float


@dataclass(frozen=True)
class Refused:
    """`moved_to`: the CE has a newer coordinator (epoch, its node id; "" for this node): the one
    asking was cut off and replaced, and should step down."""

    ce: str
    reason: str
    moved_to: tuple[int, str] | None = None


@dataclass(frozen=True)
class LeftCE:
    """The node left a CE; the runtime stops that CE's tasks. `reason` is for the log."""

    ce: str
    reason: str


@dataclass(frozen=True)
class OwnerReclaims:
    """The owner wants the machine back while it works for a CE: suspend or give back tasks."""

    ce: str


@dataclass(frozen=True)
class Stopped:
    pass


Action = Publish | Withdraw | RefreshResources | Accepted | Refused | LeftCE | OwnerReclaims | Stopped


class InvalidTransition(Exception):
    pass


# ----------------------------------------------------------------- state ----


@dataclass(frozen=True)
class NodeState:
    role: Role = Role.IDLE
    owner_busy: bool = False
    ce: str | None = None
    coordinator: str | None = None
    epoch: int = 0
    lease_until: float = 0.0
    bus: str | None = None
    data: str | None = None
    stopped: bool = False
    # The newest (epoch, coordinator) this node knew of its last few CEs, kept when it goes back to
    # Idle: a coordinator that froze and thawed after its successor finished must not recruit again.
    known: tuple[tuple[str, int, str], ...] = ()

    def newest(self, ce: str) -> tuple[int, str] | None:
        """(epoch, coordinator; "" for this node) of `ce` as this node last knew it."""
        return next(((epoch, by) for c, epoch, by in self.known if c == ce), None)

    def service(self) -> Publish | None:
        """The one service this state publishes, or None."""
        if self.stopped or (self.role is Role.IDLE and self.owner_busy):
            return None
        if self.role is Role.IDLE:
            return Publish(Role.IDLE)
        if self.role is Role.WORKER:
            return Publish(Role.WORKER, ce=self.ce, coordinator=self.coordinator, epoch=self.epoch)
        return Publish(Role.COORDINATOR, ce=self.ce, epoch=self.epoch, bus=self.bus, data=self.data)



class NodeMachine:
    """Feed events with `handle`; carry out the returned actions in order."""

    def __init__(self, node_id: str, known: tuple[tuple[str, int, str], ...] = ()) -> None:
        """`known`: the CE epochs this node remembered when its daemon last stopped."""
        self.node_id = node_id
        self.state = NodeState(known=known[:KNOWN_CES])
        self._started = False

    def start(self) -> list[Action]:
        self._started = True
        svc = self.state.service()
        return [svc] if svc else []

    def handle(self, event: Event) -> list[Action]:
        if self.state.stopped:
            return [Refused(event.ce, "node is stopping")] if isinstance(event, Recruit) else []
        handler = _TABLE.get(type(event))
        if handler is None:
            raise InvalidTransition(f"unknown event {event!r}")
        before = self.state.service()
        new_state, actions = handler(self.state, event)
        self.state = new_state
        after = new_state.service()
        if not self._started or before == after:
            return actions
        # The published service follows the state; emit the change first so
        # that a worker is announced before it starts taking tasks.
        return [after if after else Withdraw(), *actions]


# Each handler: (state, event) -> (new state, actions). One per event type.
Handler = Callable[[NodeState, "Event"], tuple[NodeState, list[Action]]]


def _owner_busy(s: NodeState, e: OwnerBusy) -> tuple[NodeState, list[Action]]:
    if s.owner_busy:
        return s, []
    actions: list[Action] = [OwnerReclaims(s.ce)] if s.role is Role.WORKER and s.ce else []
    return _with(s, owner_busy=True), actions


def _owner_free(s: NodeState, e: OwnerFree) -> tuple[NodeState, list[Action]]:
    return _with(s, owner_busy=False), []


def _recruit(s: NodeState, e: Recruit) -> tuple[NodeState, list[Action]]:
    newer = s.newest(e.ce)
    if newer is not None and newer[0] > e.epoch:
        epoch, by = newer
        who = f"coordinator {by[:8]}" if by else "this node coordinated it"
        return s, [Refused(e.ce, f"stale epoch {e.epoch}: CE {e.ce} moved to epoch {epoch} ({who})", newer)]
    if s.role is Role.WORKER and s.ce == e.ce:
        # Same CE: a (possibly new, after failover) coordinator renews us.
        until = e.now + e.lease_s
        return _remember(_with(s, coordinator=e.coordinator, epoch=e.epoch, lease_until=until), e.ce, e.epoch,
                         e.coordinator), [Accepted(e.ce, e.epoch, until)]
    if s.role is not Role.IDLE:
        return s, [Refused(e.ce, f"busy: {s.role.value} of CE {s.ce}")]
    if s.owner_busy:
        return s, [Refused(e.ce, "the owner is using this machine")]
    until = e.now + e.lease_s
    new = _with(s, role=Role.WORKER, ce=e.ce, coordinator=e.coordinator, epoch=e.epoch, lease_until=until)
    return _remember(new, e.ce, e.epoch, e.coordinator), [Accepted(e.ce, e.epoch, until)]


def _renew(s: NodeState, e: RenewLease) -> tuple[NodeState, list[Action]]:
    if s.role is Role.WORKER and s.ce == e.ce and e.epoch >= s.epoch:
        coordinator = e.coordinator or s.coordinator
        new = _with(s, epoch=e.epoch, coordinator=coordinator, lease_until=max(s.lease_until, e.now + e.lease_s))
        return _remember(new, e.ce, e.epoch, coordinator or ""), []
    return s, []


def _release(s: NodeState, e: Release) -> tuple[NodeState, list[Action]]:
    if s.role is Role.WORKER and s.ce == e.ce and e.epoch >= s.epoch:
        return _idle(s), [LeftCE(e.ce, "released by the coordinator")]
    return s, []


def _coordinate(s: NodeState, e: Coordinate) -> tuple[NodeState, list[Action]]:
    takeover = s.role is Role.WORKER and s.ce == e.ce and e.epoch > s.epoch
    again = s.role is Role.COORDINATOR and s.ce == e.ce and e.epoch >= s.epoch
    preempt = s.role is Role.WORKER and s.ce != e.ce and e.preempts
    if not (s.role is Role.IDLE or takeover or again or preempt):
        raise InvalidTransition(f"cannot coordinate CE {e.ce}: this node is a {s.role.value} of CE {s.ce}")
    actions: list[Action] = [LeftCE(s.ce or "", "left for a job submitted on this node")] if preempt else []
    new = _with(s, role=Role.COORDINATOR, ce=e.ce, coordinator=None, epoch=e.epoch, bus=e.bus, data=e.data,
                lease_until=0.0)
    return _remember(new, e.ce, e.epoch, ""), actions


def _end_coordination(s: NodeState, e: EndCoordination) -> tuple[NodeState, list[Action]]:
    if s.role is Role.COORDINATOR and s.ce == e.ce:
        return _idle(s), []
    return s, []


def _tick(s: NodeState, e: Tick) -> tuple[NodeState, list[Action]]:
    if s.role is Role.WORKER and e.now > s.lease_until:
        ce = s.ce or ""
        return _idle(s), [LeftCE(ce, "lease expired: no coordinator renewed it")]
    return s, []


def _resources(s: NodeState, e: ResourcesChanged) -> tuple[NodeState, list[Action]]:
    return s, ([RefreshResources()] if s.service() else [])


def _shutdown(s: NodeState, e: Shutdown) -> tuple[NodeState, list[Action]]:
    actions: list[Action] = [LeftCE(s.ce, "node shutting down")] if s.role is Role.WORKER and s.ce else []
    return _with(s, stopped=True), [*actions, Stopped()]


def _idle(s: NodeState) -> NodeState:
    """Back to Idle, keeping what is not about the CE it left (the owner's state, the epochs known)."""
    return NodeState(owner_busy=s.owner_busy, known=s.known)


def _remember(s: NodeState, ce: str, epoch: int, coordinator: str) -> NodeState:
    """The newest epoch of `ce` first; at most KNOWN_CES of them (a CE id is never reused)."""
    old = s.newest(ce)
    if old is not None and (old[0] > epoch or old == (epoch, coordinator)):
        return s
    rest = tuple(k for k in s.known if k[0] != ce)
    return _with(s, known=((ce, epoch, coordinator), *rest)[:KNOWN_CES])


def _with(s: NodeState, **changes: object) -> NodeState:
    return replace(s, **changes)  # type: ignore[arg-type]


_TABLE: dict[type, Handler] = {
    OwnerBusy: _owner_busy,
    OwnerFree: _owner_free,
    Recruit: _recruit,
    RenewLease: _renew,
    Release: _release,
    Coordinate: _coordinate,
    EndCoordination: _end_coordination,
    Tick: _tick,
    ResourcesChanged: _resources,
    Shutdown: _shutdown,
}
