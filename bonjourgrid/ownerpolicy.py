"""The desktop's owner comes first: when is the machine theirs, when is it lendable.

Sans-I/O: samples go in (the owner's CPU use, that is the machine's CPU minus what grid
processes use, and the free space of the disk the grid writes to), a verdict comes out only
when it changes. The CPU rule is the one BOINC ("suspend when non-BOINC CPU usage is above X%")
and HTCondor (`POLICY : DESKTOP`, CpuBusyTimer) users know: busy after the load has stayed
above the threshold for `busy_after` seconds, free again after it has stayed below for
`free_after` seconds. The two periods give hysteresis, so a desktop does not flap in and out of
the grid with every burst of activity.

The disk rule is BOINC's "leave at least X GB free": below the reserve the machine is the
owner's at once (a full disk breaks their programs, not only ours), and it is lendable again
once the free space has stayed above the reserve for `free_after` seconds. That wait also keeps
a task that fills every disk it is given from cycling through the grid's desktops at full speed.
"""

from __future__ import annotations

from dataclasses import dataclass

from .units import format_size


@dataclass(frozen=True)
class OwnerPolicy:
    cpu_threshold: float = 25.0  # percent of the whole machine used by non-grid processes
    busy_after: float = 60.0  # seconds above the threshold before the node withdraws
    free_after: float = 300.0  # seconds below it before the node offers itself again
    disk_reserve: int = 2 << 30  # bytes kept free on the grid's disk for the owner (0: no rule)

    def __post_init__(self) -> None:
        if not 0.0 <= self.cpu_threshold <= 100.0:
            raise ValueError("the owner CPU threshold is a percentage between 0 and 100")
        if self.busy_after < 0 or self.free_after < 0:
            raise ValueError("owner policy periods cannot be negative")
        if self.disk_reserve < 0:
            raise ValueError("the disk reserve cannot be negative")

    @property
    def disabled(self) -> bool:
        """The CPU rule is off (the disk rule has its own switch, a reserve of 0)."""
        return self.cpu_threshold >= 100.0


class OwnerMonitor:
    """Tracks how long each of the owner's signs has been on one side of its threshold."""

    def __init__(self, policy: OwnerPolicy) -> None:
        self.policy = policy
        self.busy = False
        self.reason = ""  # why busy (or why free again), for the log
        self.cpu_busy = False
        self.disk_low = False
        self._cpu_since: float | None = None  # when the load crossed to the other side
        self._disk_ok_since: float | None = None  # when the free space went back above the reserve

    def observe(self, now: float, owner_cpu_percent: float, free_disk: int | None = None) -> bool | None:
        """Feed one sample; return the new verdict (True = busy) when it flips, else None."""
        self._observe_cpu(now, owner_cpu_percent)
        self._observe_disk(now, free_disk)
        busy = self.cpu_busy or self.disk_low
        if busy == self.busy:
            return None
        self.busy = busy
        cpu = f"{owner_cpu_percent:.0f}% CPU outside the grid"
        if self.disk_low:
            self.reason = f"{format_size(free_disk or 0)} free on the grid's disk, below the " \
                          f"{format_size(self.policy.disk_reserve)} kept for the owner"
        elif busy or free_disk is None:
            self.reason = cpu
        else:
            self.reason = f"{cpu}, {format_size(free_disk)} free on disk"
        return busy

    def _observe_cpu(self, now: float, owner_cpu_percent: float) -> None:
        if self.policy.disabled:
            return
        above = owner_cpu_percent > self.policy.cpu_threshold
        if above == self.cpu_busy:
            self._cpu_since = None
            return
        if self._cpu_since is None:
            self._cpu_since = now
        wait = self.policy.busy_after if above else self.policy.free_after
        if now - self._cpu_since >= wait:
            self.cpu_busy = above
            self._cpu_since = None

    def _observe_disk(self, now: float, free_disk: int | None) -> None:
        if free_disk is None or not self.policy.disk_reserve:
            return
        if free_disk < self.policy.disk_reserve:
            self.disk_low, self._disk_ok_since = True, None
        elif self.disk_low:
            if self._disk_ok_since is None:
                self._disk_ok_since = now
            if now - self._disk_ok_since >= self.policy.free_after:
                self.disk_low, self._disk_ok_since = False, None
