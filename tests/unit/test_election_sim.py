"""The election state machine under a simulated network with virtual time, over many random seeds.

The network drops, delays, duplicates and reorders messages; coordinators crash, and a
coordinator may be cut off for a while and come back. Invariants:

* fencing: a node never follows a claim (epoch, coordinator) lower than one it followed before;
* unique claims: no two nodes ever take over with the same epoch;
* convergence: once faults stop, every live node follows the same live coordinator, and exactly
  one live node acts as coordinator; or, when no replica survived, every worker gave its node
  back within its lease (no orphans).
"""

from __future__ import annotations

import heapq
import itertools
import random
from dataclasses import dataclass, field

import pytest

from bonjourgrid.election import Election, GiveUp, Reattach, TakeOver, supersedes

TIMEOUT = 1.0
LEASE = 12.0
HB = 0.25
K = 2  # replicas


@dataclass
class Node:
    name: str
    election: Election | None = None
    coordinating: int | None = None  # epoch, when acting as coordinator
    replicas: tuple[str, ...] = ()
    alive: bool = True
    cut_off_until: float = 0.0  # a partitioned node neither sends nor receives
    followed: list[tuple[int, str]] = field(default_factory=list)
    gave_up: bool = False


class Sim:
    def __init__(self, seed: int, n: int = 6, drop: float = 0.2, dup: float = 0.1, max_delay: float = 0.4):
        self.rng = random.Random(seed)
        self.drop, self.dup, self.max_delay = drop, dup, max_delay
        self.now = 0.0
        self.queue: list[tuple[float, int, object]] = []
        self.seq = itertools.count()
        self.faults_until = 0.0
        names = [f"n{i}" for i in range(n)]
        self.nodes = {x: Node(x) for x in names}
        coord = self.nodes[names[0]]
        coord.coordinating, coord.replicas = 1, tuple(names[1:1 + K])
        for x in names[1:]:
            nd = self.nodes[x]
            nd.election = Election(x, "ce", 1, names[0], TIMEOUT, LEASE, 0.0, replicas=coord.replicas)
            nd.followed.append((1, names[0]))
        self.claims: dict[int, set[str]] = {1: {names[0]}}

    # -- plumbing --
    def at(self, t: float, what: object) -> None:
        heapq.heappush(self.queue, (t, next(self.seq), what))

    def reachable(self, x: str) -> bool:
        nd = self.nodes[x]
        return nd.alive and self.now >= nd.cut_off_until

    def send(self, src: str, dst: str, msg: tuple) -> None:
        faulty = self.now < self.faults_until
        if faulty and self.rng.random() < self.drop:
            return
        copies = 2 if faulty and self.rng.random() < self.dup else 1
        for _ in range(copies):
            delay = self.rng.uniform(0, self.max_delay if faulty else 0.02)
            self.at(self.now + delay, ("deliver", src, dst, msg))

    # -- behaviour --
    def step(self, what: object) -> None:
        kind = what[0]
        if kind == "tick":
            for nd in self.nodes.values():
                if nd.alive:
                    self.tick(nd)
            self.at(self.now + 0.05, ("tick",))
        elif kind == "beat":
            for nd in self.nodes.values():
                if nd.coordinating is not None and self.reachable(nd.name):
                    for other in self.nodes:
                        if other != nd.name:
                            self.send(nd.name, other, ("hb", nd.coordinating, nd.name, nd.replicas))
            self.at(self.now + HB, ("beat",))
        elif kind == "deliver":
            _, src, dst, msg = what
            if self.reachable(dst) and self.reachable(src):
                self.receive(self.nodes[dst], msg)
        elif kind == "crash":
            self.nodes[what[1]].alive = False
        elif kind == "cut":
            self.nodes[what[1]].cut_off_until = self.now + what[2]

    def receive(self, nd: Node, msg: tuple) -> None:
        kind, epoch, coord = msg[0], msg[1], msg[2]
        if nd.coordinating is not None:
            if supersedes(epoch, coord, nd.coordinating, nd.name):
                self.step_down(nd, epoch, coord)
            return
        if nd.election is None:
            return
        if kind == "hb":
            actions = nd.election.heartbeat(epoch, coord, self.now, replicas=msg[3])
        else:
            actions = nd.election.coordinator_seen(epoch, coord, None, None, self.now)
        self.apply(nd, actions)

    def step_down(self, nd: Node, epoch: int, coord: str) -> None:
        nd.coordinating = None
        nd.election = Election(nd.name, "ce", epoch, coord, TIMEOUT, LEASE, self.now)
        nd.followed.append((epoch, coord))

    def tick(self, nd: Node) -> None:
        if nd.election is not None and nd.coordinating is None:
            self.apply(nd, nd.election.tick(self.now))

    def apply(self, nd: Node, actions: list) -> None:
        for a in actions:
            if isinstance(a, Reattach):
                assert not supersedes(*nd.followed[-1], a.epoch, a.coordinator), "fencing violated"
                nd.followed.append((a.epoch, a.coordinator))
            elif isinstance(a, TakeOver):
                self.claims.setdefault(a.epoch, set()).add(nd.name)
                nd.coordinating = a.epoch
                nd.followed.append((a.epoch, nd.name))
                others = [x for x in self.nodes if x != nd.name and self.nodes[x].alive]
                nd.replicas = tuple(others[:K])
                for other in self.nodes:
                    if other != nd.name:
                        self.send(nd.name, other, ("seen", a.epoch, nd.name))
            elif isinstance(a, GiveUp):
                nd.gave_up = True
                nd.election = None

    def run(self, until: float) -> None:
        self.at(0.0, ("tick",))
        self.at(0.0, ("beat",))
        while self.queue and self.queue[0][0] <= until:
            self.now, _, what = heapq.heappop(self.queue)
            self.step(what)


def scenario(seed: int) -> Sim:
    rng = random.Random(seed * 7919)
    sim = Sim(seed, drop=rng.choice([0.0, 0.1, 0.3]), dup=rng.choice([0.0, 0.2]),
              max_delay=rng.choice([0.05, 0.3, 0.8]))
    sim.faults_until = 20.0
    t = rng.uniform(1, 4)
    sim.at(t, ("crash", "n0"))
    if rng.random() < 0.5:  # the successor dies too
        sim.at(t + rng.uniform(2.5, 6), ("crash", "n1"))
    if rng.random() < 0.3:  # a replica is cut off for a while and comes back
        sim.at(rng.uniform(0, 8), ("cut", "n2", rng.uniform(0.5, 4)))
    return sim


@pytest.mark.parametrize("seed", range(300))
def test_election_invariants(seed: int) -> None:
    sim = scenario(seed)
    sim.run(until=60.0)
    for epoch, who in sim.claims.items():
        assert len(who) == 1, f"epoch {epoch} claimed by {who}"
    live = [nd for nd in sim.nodes.values() if nd.alive]
    coords = [nd for nd in live if nd.coordinating is not None]
    if coords:
        assert len(coords) == 1, f"{len(coords)} live coordinators"
        c = coords[0]
        for nd in live:
            if nd is not c and not nd.gave_up:
                assert nd.followed[-1] == (c.coordinating, c.name), (nd.name, nd.followed[-1])
    else:  # nobody could take over: everybody gave its node back (no orphans)
        assert all(nd.gave_up for nd in live), [(nd.name, nd.followed[-1]) for nd in live]


def test_a_partitioned_coordinator_steps_down_when_it_hears_the_successor() -> None:
    sim = Sim(seed=1, drop=0.0, dup=0.0)
    sim.faults_until = 0.0
    sim.at(1.0, ("cut", "n0", 5.0))
    sim.run(until=20.0)
    assert sim.nodes["n0"].coordinating is None
    assert sim.nodes["n1"].coordinating == 2  # rank 1 took over with epoch 1 + 1
    assert sim.nodes["n0"].followed[-1] == (2, "n1")
