"""BOINC failover: SIGKILL of the coordinator's host mid-job, real boinc clients, namespaced hosts (needs root).

Prints, as medians over N runs: the time from the SIGKILL to the first result the
successor accepts, and the makespan (submit to results copied) of 20 tasks with one
coordinator crash against the same job without one. The job is the integration test's:
`sleep 2` then a hash of a shared input into an output file, on 3 workers of 2 slots,
the coordinator's host killed once 3 tasks are done. Usage:
python benchmarks/boinc_failover.py [--runs 3] [--logs DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import tempfile
import time
from datetime import datetime
from pathlib import Path

from bonjourgrid.gridkey import GridKey
from bonjourgrid.testbed import HASH_TASK_PY, Host, Testbed, bonjourgrid_argv, wait_for

NODE_ARGS = ("--cpus", "2", "--owner-cpu", "100", "--failover-timeout", "1", "--lease", "6")
TASKS = 20
JOB = f"""
name = "bench-boinc"
backend = "boinc"
inputs = ["work.py", {{ src = "data.txt", dest = "data.txt" }}]
outputs = ["out-*.txt"]
[sweep]
argv = ["sh", "-c", "sleep 2; exec python3 work.py {{i}}"]
count = {TASKS}
"""


def stamp(line: str) -> float:
    return datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()


def kill_host_but(host: Host, keep: int) -> None:
    """SIGKILL every process of the host (node daemon, broker, BOINC project server) but the submit command."""
    pids = subprocess.run(["ip", "netns", "pids", host.netns], capture_output=True, text=True,
                          check=False).stdout.split()
    for pid in pids:
        with contextlib.suppress(OSError, ValueError):
            if int(pid) != keep:
                os.kill(int(pid), signal.SIGKILL)


def one_run(crash: bool, logs: Path | None = None) -> tuple[float, float | None]:
    """(makespan in s, SIGKILL to the successor's first accepted result in s, or None); node logs go to `logs`."""
    with tempfile.TemporaryDirectory() as d, Testbed(4, Path(d) / "tb") as tb:
        key = Path(d) / "grid.key"
        GridKey.generate().write(key)
        job = Path(d) / "job"
        job.mkdir()
        (job / "work.py").write_text(HASH_TASK_PY)
        (job / "data.txt").write_text("some shared input data\n" * 1000)
        (job / "job.toml").write_text(JOB)
        procs = [h.spawn(bonjourgrid_argv("node", "--key-file", str(key), "--state-dir", str(Path(d) / h.name),
                                          "--name", h.name, *NODE_ARGS, *(("--log-level", "debug") if logs else ())),
                         "node") for h in tb.hosts]
        cli = ("--key-file", str(key), "--state-dir", str(Path(d) / "host1"))

        def jobs() -> list[dict]:
            r = tb.hosts[0].run(bonjourgrid_argv("jobs", "--json", *cli))
            return json.loads(r.stdout) if r.returncode == 0 else []

        def seen() -> bool:
            r = tb.hosts[0].run(bonjourgrid_argv("nodes", "--json", *cli))
            return r.returncode == 0 and len(json.loads(r.stdout)) == 4

        wait_for(seen, 60, 0.2, "four nodes")
        t0 = time.time()
        sub = tb.hosts[0].spawn(bonjourgrid_argv("submit", "--wait", "--json", *cli, "--results",
                                                 str(Path(d) / "r"), str(job / "job.toml")), "submit")
        failover = None
        if crash:
            wait_for(lambda: max((j["tasks_done"] for j in jobs()), default=0) >= 3, 180, 0.2, "3 tasks done")
            killed = time.time()
            kill_host_but(tb.hosts[0], sub.pid)
            line = wait_for(lambda: next((ln for p in procs[1:] for ln in p.output().splitlines()
                                          if "first result accepted after the takeover" in ln), None),
                            180, 0.05, "the successor's first result")
            failover = stamp(line) - killed
        wait_for(lambda: not sub.alive(), 600, 0.2, "the job to end")
        makespan = time.time() - t0
        summary = json.loads([ln for ln in sub.output().splitlines() if ln.startswith("{")][-1])
        assert summary["state"] == "done" and summary["tasks_done"] == TASKS, summary
        for p in procs:
            p.stop()
        if logs is not None:
            run = logs / f"{'crash' if crash else 'clean'}-{int(t0)}"
            run.mkdir(parents=True, exist_ok=True)
            for h, p in zip(tb.hosts, procs, strict=True):
                (run / f"{h.name}.log").write_text(p.output())
            (run / "submit.log").write_text(sub.output())
    return makespan, failover


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--logs", type=Path, help="keep every run's node logs under this directory")
    a = ap.parse_args()
    crashed = [one_run(True, a.logs) for _ in range(a.runs)]
    clean = [one_run(False, a.logs) for _ in range(a.runs)]
    fo = [f for _, f in crashed if f is not None]
    m_crash, m_clean = statistics.median(m for m, _ in crashed), statistics.median(m for m, _ in clean)
    print(f"4 hosts (a coordinator, 3 workers of 2 slots, real boinc clients), {TASKS} tasks of sleep 2 + hash, "
          "coordinator host SIGKILLed once 3 tasks are done, failover timeout 1 s\n")
    print(f"{'failover: SIGKILL -> first result accepted by the successor':62} median {statistics.median(fo):5.2f} s"
          f"  (min {min(fo):.2f}, max {max(fo):.2f}, {len(fo)} runs)")
    print(f"{'makespan without a crash':62} median {m_clean:5.2f} s  (runs: "
          f"{', '.join(f'{m:.1f}' for m, _ in clean)})")
    print(f"{'makespan with one coordinator crash':62} median {m_crash:5.2f} s  (runs: "
          f"{', '.join(f'{m:.1f}' for m, _ in crashed)})")
    print(f"{'extra makespan':62} {m_crash - m_clean:+5.2f} s")
    print(f"every run: all {TASKS} results present, state done")


if __name__ == "__main__":
    main()
