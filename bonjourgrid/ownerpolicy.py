"""The desktop's owner comes first: when is the machine theirs, when is it lendable.

Sans-I/O: samples of the owner's CPU use go in (the machine's CPU minus what
grid processes use), a verdict comes out only when it changes. The rule is
the one BOINC ("suspend when non-BOINC CPU usage is above X%") and HTCondor
(`POLICY : DESKTOP`, CpuBusyTimer) users know: busy after the load has stayed
above the threshold for `busy_after` seconds, free again after it has stayed
below for `free_after` seconds. The two periods give hysteresis, so a
desktop does not flap in and out of the grid with every burst of activity.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class OwnerPolicy:
    cpu_threshold: float = 25.0  # percent of the whole machine used by non-grid processes
    busy_after: float = 60.0  # seconds above the threshold before the node withdraws
    free_after: float = 300.0  # seconds below it before the node offers itself again

    def __post_init__(self) -> None:
        if not 0.0 <= self.cpu_threshold <= 100.0:
            raise ValueError("the owner CPU threshold is a percentage between 0 and 100")
        if self.busy_after < 0 or self.free_after < 0:
            raise ValueError("owner policy periods cannot be negative")

    @property
    def disabled(self) -> bool:
        return self.cpu_threshold >= 100.0


class OwnerMonitor:
    """Tracks how long the owner's load has been on one side of the threshold."""

    def __init__(self, policy: OwnerPolicy) -> None:
        self.policy = policy
        self.busy = False
        self._since: float | None = None  # when the load crossed to the other side

    def observe(self, now: float, owner_cpu_percent: float) -> bool | None:
        """Feed one sample; return the new verdict (True = busy) when it flips, else None."""
        if self.policy.disabled:
            return None
        above = owner_cpu_percent > self.policy.cpu_threshold
        if above == self.busy:
            self._since = None
            return None
        if self._since is None:
            self._since = now
        wait = self.policy.busy_after if above else self.policy.free_after
        if now - self._since >= wait:
            self.busy = above
            self._since = None
            return self.busy
        return None
