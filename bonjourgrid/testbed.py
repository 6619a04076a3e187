"""A grid of isolated hosts on one machine: network namespaces on a private bridge.

Used by the test suite and by the demo. Every host is a network namespace
with one veth link to a bridge that lives in a namespace of its own, so no
packet (mDNS multicast included) ever reaches the machine's real network,
and the machine's own namespace is not touched at all. Needs root
(CAP_NET_ADMIN).

Faults are real: `kill(SIGKILL)`, `link_down()`/`link_up()` (the bridge port
goes down, the host sees its carrier drop), `partition()`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

PREFIX = "bgt-"
# A task with an input and an output that the tests and benchmarks share: task i hashes data.txt
# with i into out-<i>.txt and prints "task <i> ok".
HASH_TASK_PY = """\
import hashlib, sys
i = int(sys.argv[1])
data = open("data.txt", "rb").read()
with open(f"out-{i}.txt", "w") as f:
    f.write(f"{i} {hashlib.sha256(data + str(i).encode()).hexdigest()}\\n")
print(f"task {i} ok")
"""
SUBNET = "10.213.0"  # only ever inside the namespaces this module creates


class TestbedError(RuntimeError):
    pass


def can_build() -> str | None:
    """None when namespaces can be built here, else the reason why not."""
    if os.geteuid() != 0:
        return "building network namespaces needs root (CI runs as root)"
    if not shutil.which("ip"):
        return "the `ip` command (iproute2) is missing"
    return None


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and r.returncode != 0:
        raise TestbedError(f"ip {' '.join(args)}: {r.stderr.strip()}")
    return r


@dataclass
class Proc:
    """A process running in a host; its output goes to `log`."""

    popen: subprocess.Popen[bytes]
    log: Path
    argv: Sequence[str]

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, sig)

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(5)

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, then SIGKILL if it lingers; returns the exit code."""
        if self.alive():
            self.signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.popen.returncode

    def output(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except FileNotFoundError:
            return ""


@dataclass
class Host:
    testbed: Testbed
    index: int
    netns: str
    ip: str
    port: str  # the bridge port (in the switch namespace) of this host's link
    procs: list[Proc] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"host{self.index}"

    def spawn(self, argv: Sequence[str], log_name: str, env: dict[str, str] | None = None) -> Proc:
        log = self.testbed.workdir / f"{self.name}-{log_name}.log"
        with open(log, "ab") as f:
            popen = subprocess.Popen(
                ["ip", "netns", "exec", self.netns, *argv],
                stdout=f,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                env={**os.environ, **(env or {})},
            )
        proc = Proc(popen, log, argv)
        self.procs.append(proc)
        return proc

    def run(self, argv: Sequence[str], timeout: float = 60.0, env: dict[str, str] | None = None,
            check: bool = False) -> subprocess.CompletedProcess[str]:
        r = subprocess.run(
            ["ip", "netns", "exec", self.netns, *argv],
            capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
            env={**os.environ, **(env or {})},
        )
        if check and r.returncode != 0:
            raise TestbedError(f"{self.name}: {' '.join(argv)} exited {r.returncode}: {r.stderr[-2000:]}")
        return r

    def processes(self) -> dict[int, str]:
        """pid -> command line of every process in this host's namespace (the PID space is shared)."""
        out = {}
        for pid in _ip("netns", "pids", self.netns, check=False).stdout.split():
            with contextlib.suppress(OSError):
                out[int(pid)] = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        return out

    def link_down(self) -> None:
        _ip("-n", self.testbed.switch, "link", "set", self.port, "down")

    def link_up(self) -> None:
        _ip("-n", self.testbed.switch, "link", "set", self.port, "up")

    def kill_all(self) -> None:
        for p in self.procs:
            p.kill()


class Testbed:
    """`with Testbed(5, workdir) as tb:` builds five hosts and always tears them down."""

    def __init__(self, n_hosts: int, workdir: Path) -> None:
        if not 1 <= n_hosts <= 250:
            raise ValueError("between 1 and 250 hosts")
        self.n_hosts = n_hosts
        self.workdir = Path(workdir)
        self.tag = f"{PREFIX}{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.switch = f"{self.tag}-sw"
        self.hosts: list[Host] = []
        self._namespaces: list[str] = []
        self._bridges: list[str] = []  # extra bridges made by `partition`

    def __enter__(self) -> Testbed:
        try:
            self.create()
        except BaseException:
            self.destroy()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.destroy()

    def create(self) -> None:
        reason = can_build()
        if reason:
            raise TestbedError(reason)
        self.workdir.mkdir(parents=True, exist_ok=True)
        cleanup_stale()
        self._add_netns(self.switch)
        _ip("-n", self.switch, "link", "add", "br0", "type", "bridge", "mcast_snooping", "0")
        _ip("-n", self.switch, "link", "set", "br0", "up")
        for i in range(1, self.n_hosts + 1):
            self.add_host(i)

    def add_host(self, i: int) -> Host:
        netns, port, ip = f"{self.tag}-h{i}", f"p{i}", f"{SUBNET}.{i}"
        self._add_netns(netns)
        _ip("-n", netns, "link", "add", "eth0", "type", "veth", "peer", "name", port, "netns", self.switch)
        _ip("-n", self.switch, "link", "set", port, "master", "br0")
        _ip("-n", self.switch, "link", "set", port, "up")
        _ip("-n", netns, "addr", "add", f"{ip}/24", "dev", "eth0")
        _ip("-n", netns, "link", "set", "lo", "up")
        _ip("-n", netns, "link", "set", "eth0", "up")
        _ip("-n", netns, "route", "add", "224.0.0.0/4", "dev", "eth0")
        host = Host(self, i, netns, ip, port)
        self.hosts.append(host)
        return host

    def _add_netns(self, name: str) -> None:
        _ip("netns", "add", name)
        self._namespaces.append(name)

    def partition(self, *groups: Sequence[Host]) -> None:
        """Split the network: each group gets a bridge of its own, so groups no longer hear each other."""
        for g, hosts in enumerate(groups):
            bridge = "br0" if g == 0 else f"br{g}"
            if g and bridge not in self._bridges:
                _ip("-n", self.switch, "link", "add", bridge, "type", "bridge", "mcast_snooping", "0")
                _ip("-n", self.switch, "link", "set", bridge, "up")
                self._bridges.append(bridge)
            for h in hosts:
                _ip("-n", self.switch, "link", "set", h.port, "master", bridge)

    def heal(self) -> None:
        """Undo `partition`: every host on one segment again."""
        for h in self.hosts:
            _ip("-n", self.switch, "link", "set", h.port, "master", "br0")

    def destroy(self) -> None:
        for h in self.hosts:
            h.kill_all()
        for ns in reversed(self._namespaces):
            _kill_netns_pids(ns)
            _ip("netns", "del", ns, check=False)
        self._namespaces.clear()


def _kill_netns_pids(ns: str) -> None:
    r = _ip("netns", "pids", ns, check=False)
    for pid in r.stdout.split():
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)


def cleanup_stale() -> None:
    """Remove namespaces left by a testbed whose process died (a crashed test run)."""
    r = _ip("netns", "list", check=False)
    for line in r.stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        if not name.startswith(PREFIX):
            continue
        try:
            owner = int(name[len(PREFIX):].split("-")[0])
        except ValueError:
            continue
        if owner != os.getpid() and not _pid_alive(owner):
            _kill_netns_pids(name)
            _ip("netns", "del", name, check=False)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def bonjourgrid_argv(*args: str) -> list[str]:
    """Run the CLI of this very installation inside a namespace."""
    return [sys.executable, "-m", "bonjourgrid", *args]


def wait_for(predicate, timeout: float, interval: float = 0.05, what: str = "condition"):  # type: ignore[no-untyped-def]
    """Poll until `predicate()` is truthy; return its value or raise TimeoutError."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)
