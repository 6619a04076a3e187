"""How fast do N freshly started nodes see each other, and what does an idle node cost?

Starts N node daemons at once, each in its own namespaced host, and reads
from each daemon's log when it had all N nodes in its view. Then lets the
grid sit idle and reports each daemon's resident memory and CPU use.
Needs root.  Usage: python benchmarks/discovery.py [N] [ROUNDS]
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import psutil

from bonjourgrid.gridkey import GridKey
from bonjourgrid.testbed import Testbed, bonjourgrid_argv, wait_for


def stamp(line: str) -> float:
    return datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()


def one_round(n: int, work: Path, idle_s: float) -> tuple[float, float, list[float], list[float]]:
    key = work / "grid.key"
    if not key.exists():
        GridKey.generate().write(key)
    with Testbed(n, work / f"tb-{time.monotonic_ns()}") as tb:
        t0 = time.time()
        procs = [h.spawn(bonjourgrid_argv("node", "--key-file", str(key), "--state-dir", str(tb.workdir / h.name),
                                          "--name", h.name, "--owner-cpu", "100"), "node") for h in tb.hosts]

        def complete() -> list[float] | None:
            times = []
            for p in procs:
                seen, t_all = set(), None
                for line in p.output().splitlines():
                    if "grid: updated" in line:
                        seen.add(line.split("grid: updated ")[1].split()[0])
                        if len(seen) == n:
                            t_all = stamp(line)
                            break
                if t_all is None:
                    return None
                times.append(t_all)
            return times

        times = wait_for(complete, 60, 0.2, "every node to see every node")
        up = [stamp(next(ln for ln in p.output().splitlines() if " up on " in ln)) for p in procs]
        time.sleep(idle_s)
        ps = [psutil.Process(p.pid) for p in procs]
        cpu0 = [x.cpu_times() for x in ps]
        time.sleep(idle_s)
        cpu1 = [x.cpu_times() for x in ps]
        rss = [x.memory_info().rss / 2**20 for x in ps]
        cpu = [100 * ((b.user + b.system) - (a.user + a.system)) / idle_s for a, b in zip(cpu0, cpu1, strict=True)]
        for p in procs:
            p.stop()
    return max(times) - t0, max(times) - max(up), rss, cpu


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    with tempfile.TemporaryDirectory() as d:
        results = [one_round(n, Path(d), 5.0) for _ in range(rounds)]
    launch = [r[0] for r in results]
    after_up = [r[1] for r in results]
    rss = [x for r in results for x in r[2]]
    cpu = [x for r in results for x in r[3]]
    print(f"{n} nodes, {rounds} rounds")
    print(f"{'launch -> all nodes see all (s)':40} median {statistics.median(launch):.2f}  max {max(launch):.2f}")
    print(f"{'last node announced -> all see all (s)':40} median {statistics.median(after_up):.2f}  "
          f"max {max(after_up):.2f}")
    print(f"{'idle daemon RSS (MiB)':40} median {statistics.median(rss):.1f}  max {max(rss):.1f}")
    print(f"{'idle daemon CPU (% of one core)':40} median {statistics.median(cpu):.2f}  max {max(cpu):.2f}")


if __name__ == "__main__":
    main()
