"""A node's live view of its grid, built from DNS-SD records (sans-I/O).

The mDNS runtime hands every record it resolves to `GridView.offer` and every
removal to `GridView.remove`. The view keeps, per node, the newest authentic
announcement, and counts what it ignored and why, so a user can see that a
hostile or misconfigured host is shouting on the LAN.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

from .announcement import Announcement, Rejected, Role, parse_announcement
from .gridkey import GridKey

log = logging.getLogger(__name__)

MAX_IGNORED = 1024  # distinct ignored services remembered; a flood cannot grow memory


@dataclass(frozen=True)
class NodeRecord:
    ann: Announcement
    addresses: tuple[str, ...]
    port: int
    first_seen: float
    last_update: float
    in_service_since: float = 0.0  # when the node's record was first of this service (its state's)

    def to_json(self, now: float) -> dict[str, object]:
        a = self.ann
        return {
            "id": a.node_id,
            "host": a.host,
            "addresses": list(self.addresses),
            "port": self.port,
            "state": a.role.value,
            "grid": a.grid,
            "cpus": a.cpus,
            "memory": a.memory_mib << 20,
            "free_slots": a.free_slots,
            "free_memory": a.free_memory_mib << 20,
            "load": a.load,
            "os": a.os,
            "arch": a.arch,
            "caps": list(a.caps),
            "ce": a.ce,
            "coordinator": a.coordinator,
            "epoch": a.epoch,
            "bus": a.bus,
            "data": a.data,
            "age": round(now - self.first_seen, 1),
        }


class GridView:
    def __init__(self, grid: str, key: GridKey) -> None:
        self.grid = grid
        self.key = key
        self.nodes: dict[str, NodeRecord] = {}
        # instance name -> node id, to remove the right node on a goodbye
        self._instances: dict[str, str] = {}
        self.ignored: dict[str, str] = {}  # instance name -> reason (distinct services)
        self.dropped: Counter[str] = Counter()  # every dropped record, by reason
        self._newest: dict[str, int] = {}  # instance name -> newest timestamp accepted for it
        # node id -> newest record accepted for it, kept after its goodbye: a record of a state it
        # has left, read again from an mDNS cache, must not bring it back in that state.
        self._last: dict[str, NodeRecord] = {}

    def offer(
        self,
        service_type: str,
        instance_name: str,
        txts: Iterable[dict[bytes, bytes | None]],
        addresses: tuple[str, ...],
        port: int,
        now: float,
    ) -> NodeRecord | None:
        """Take a resolved service; return the node's record if the view changed.

        `txts` is every TXT record a cache holds for the service: for a moment after a node says a
        new one, the one it replaces is cached beside it, and nothing but the signed timestamps
        tells which is newer (a cache restamps the old one as it marks it to expire)."""
        authentic = []
        for txt in txts:
            try:
                authentic.append(
                    parse_announcement(service_type, instance_name, txt, self.key, self.grid, int(now * 1000)))
            except Rejected as r:
                self._drop(instance_name, r.reason, r.detail)
        if not authentic:
            return None
        ann = max(authentic, key=lambda a: a.timestamp_ms)
        old = self.nodes.get(ann.node_id)
        last = self._last.get(ann.node_id)
        if last is not None and ann.timestamp_ms < last.ann.timestamp_ms:
            # An older signed record than the one we hold: never go back in time. The very record
            # we last accepted for that service is a straggler (the state a node just left, read
            # again from the mDNS cache after its goodbye), not worth a warning; any other is a replay.
            if ann.timestamp_ms == self._newest.get(instance_name):
                self.dropped["superseded"] += 1
                log.debug("ignoring %s: superseded by a newer record of %s", instance_name[:80], ann.node_id)
            else:
                self._drop(instance_name, "replayed", ann.node_id)
            return None
        self.ignored.pop(instance_name, None)
        if instance_name not in self._newest and len(self._newest) >= MAX_IGNORED:
            del self._newest[next(iter(self._newest))]
        self._newest[instance_name] = ann.timestamp_ms
        since = old.in_service_since if old is not None and old.ann.instance_name == instance_name else now
        rec = NodeRecord(ann, addresses, port, old.first_seen if old else now, now, since)
        self.nodes[ann.node_id] = rec
        if ann.node_id not in self._last and len(self._last) >= MAX_IGNORED:
            del self._last[next(iter(self._last))]
        self._last[ann.node_id] = rec
        self._instances[instance_name] = ann.node_id
        return rec

    def remove(self, instance_name: str) -> NodeRecord | None:
        """A goodbye (or expiry) for one service; the node goes only if that was its current one."""
        self.ignored.pop(instance_name, None)
        node_id = self._instances.pop(instance_name, None)
        rec = self.nodes.get(node_id) if node_id else None
        if rec is not None and rec.ann.instance_name == instance_name:
            del self.nodes[rec.ann.node_id]
            return rec
        return None

    def restore(self, instance_name: str) -> NodeRecord | None:
        """The service was announced again after its goodbye (the goodbye was a late one, for an
        earlier registration of the name): its node is back with the newest record we had of it."""
        node_id = Announcement.node_id_of(instance_name)
        last = self._last.get(node_id)
        if node_id in self.nodes or last is None or last.ann.instance_name != instance_name:
            return None
        self.nodes[node_id] = last
        self._instances[instance_name] = node_id
        return last

    def _drop(self, instance_name: str, reason: str, detail: str) -> None:
        self.dropped[reason] += 1
        if self.ignored.get(instance_name) != reason:
            level = logging.DEBUG if reason == "other-grid" else logging.WARNING
            log.log(level, "ignoring %s: %s %s", instance_name[:80], reason, detail)
        if instance_name not in self.ignored and len(self.ignored) >= MAX_IGNORED:
            del self.ignored[next(iter(self.ignored))]
        self.ignored[instance_name] = reason

    def ignored_summary(self) -> Counter[str]:
        return Counter(self.ignored.values())

    def coordinators_of(self, ce: str) -> list[NodeRecord]:
        """Every node announcing itself as coordinator of `ce` with an epoch (a CE may briefly have two)."""
        return [r for r in self.nodes.values()
                if r.ann.role is Role.COORDINATOR and r.ann.ce == ce and r.ann.epoch is not None]

    def sorted_nodes(self) -> list[NodeRecord]:
        return sorted(self.nodes.values(), key=lambda r: (r.ann.host, r.ann.node_id))
