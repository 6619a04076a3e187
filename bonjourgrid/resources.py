"""What a node can lend, what it is using, and when that is worth re-announcing.

A multicast TXT update reaches every desktop of the LAN, so a hundred nodes
re-announcing every load wiggle would flood it. `AnnounceThrottle` decides
(pure logic) when a change is significant; `ResourceProbe` reads psutil.
"""

from __future__ import annotations

import contextlib
import os
import platform
import shutil
import sys
from dataclasses import dataclass

import psutil


@dataclass(frozen=True)
class Resources:
    free_slots: int
    free_memory_mib: int
    load: float  # fraction of the machine's CPU in use, 0..1


@dataclass(frozen=True)
class ThrottlePolicy:
    min_interval: float = 10.0  # never re-announce more often than this
    max_age: float = 600.0  # re-sign at least this often (bounds how old a replayed record can be)
    load_step: float = 0.15  # a load change smaller than this is noise
    memory_step: float = 0.10  # fraction of lent memory


class AnnounceThrottle:
    def __init__(self, policy: ThrottlePolicy, memory_lent_mib: int) -> None:
        self.policy = policy
        self.memory_lent_mib = max(memory_lent_mib, 1)
        self.last: Resources | None = None
        self.last_at = float("-inf")

    def significant(self, new: Resources) -> bool:
        old = self.last
        if old is None:
            return True
        return (
            new.free_slots != old.free_slots
            or abs(new.load - old.load) >= self.policy.load_step
            or abs(new.free_memory_mib - old.free_memory_mib) / self.memory_lent_mib >= self.policy.memory_step
        )

    def should_announce(self, new: Resources, now: float) -> bool:
        """True when `new` should go out now; the caller then calls `announced`."""
        elapsed = now - self.last_at
        if elapsed >= self.policy.max_age:
            return True
        # Slot changes matter to recruiters right away; load and memory can wait.
        if self.last is not None and new.free_slots != self.last.free_slots:
            return True
        return elapsed >= self.policy.min_interval and self.significant(new)

    def announced(self, res: Resources, now: float) -> None:
        self.last, self.last_at = res, now


class ResourceProbe:
    """Reads the machine; keeps CPU-time counters between calls to measure use over an interval."""

    def __init__(self, cpus_lent: int, memory_lent_mib: int) -> None:
        self.cpus_lent = cpus_lent
        self.memory_lent_mib = memory_lent_mib
        self.machine_cpus = psutil.cpu_count() or 1
        self._me = psutil.Process()
        self._last_total: float | None = None
        self._last_grid: float | None = None
        self._last_wall: float | None = None

    def _grid_cpu_seconds(self) -> float:
        """CPU seconds used by this daemon and everything it started (tasks, brokers)."""
        total = 0.0
        procs = [self._me]
        with contextlib.suppress(psutil.Error):
            procs += self._me.children(recursive=True)
        for p in procs:
            try:
                t = p.cpu_times()
                total += t.user + t.system + t.children_user + t.children_system
            except psutil.Error:
                continue  # exited between listing and reading
        return total

    def sample(self, now: float, busy_slots: int = 0) -> tuple[Resources, float]:
        """(resources to announce, owner CPU percent of the whole machine since the last sample)."""
        t = psutil.cpu_times()
        total_busy = t.user + t.nice + t.system + getattr(t, "irq", 0) + getattr(t, "softirq", 0) + getattr(
            t, "steal", 0
        )
        grid = self._grid_cpu_seconds()
        load = owner = 0.0
        if self._last_wall is not None and now > self._last_wall:
            capacity = (now - self._last_wall) * self.machine_cpus
            used = max(total_busy - (self._last_total or 0.0), 0.0)
            grid_used = min(max(grid - (self._last_grid or 0.0), 0.0), used)
            load = min(used / capacity, 1.0)
            owner = min(100.0 * (used - grid_used) / capacity, 100.0)
        self._last_total, self._last_grid, self._last_wall = total_busy, grid, now
        avail_mib = psutil.virtual_memory().available >> 20
        res = Resources(
            free_slots=max(self.cpus_lent - busy_slots, 0),
            free_memory_mib=min(avail_mib, self.memory_lent_mib),
            load=round(load, 2),
        )
        return res, owner


def default_memory_mib() -> int:
    """Lend half the machine's memory unless told otherwise."""
    return (psutil.virtual_memory().total >> 20) // 2


def probe_capabilities(tags: dict[str, str]) -> tuple[str, ...]:
    """Capabilities a task can require: probed ones first, then the user's tags (Steep-style)."""
    caps = [f"python{sys.version_info.major}.{sys.version_info.minor}", platform.system().lower()]
    if shutil.which("docker") and os.path.exists("/var/run/docker.sock"):
        caps.append("docker")
    if shutil.which("nvidia-smi"):
        caps.append("gpu")
    caps += [f"{k}={v}" if v else k for k, v in sorted(tags.items())]
    # keep order, drop duplicates
    return tuple(dict.fromkeys(caps))
