"""BonjourGrid's native backend against ProcessPoolExecutor and Dask, side by side, on this machine.

Tasks run `true`. BonjourGrid: a coordinator and 2 worker nodes of 1 slot each, each in its own
namespaced host (needs root). Baselines: ProcessPoolExecutor(2) and a Dask LocalCluster of 2
single-threaded worker processes, both running `subprocess.run(["true"])`.

BonjourGrid runs with its default CE broker (Mosquitto, which scripts/setup.sh installs), and
again with the built-in amqtt (`node --ce-broker amqtt`, what a desktop without Mosquitto gets).

The systems run in turn, several rounds, and each row is the median (with the range): a shared
2-core VM drifts by a third from one minute to the next, which a single run of each cannot show.

Usage: python benchmarks/ce_throughput.py [--tasks 2000] [--rounds 3] [--latency-runs 200]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from bonjourgrid.gridkey import GridKey
from bonjourgrid.testbed import Testbed, bonjourgrid_argv, wait_for


def run_true(_: int = 0) -> int:
    return subprocess.run(["true"], check=False).returncode


def ppe_rate(pool: ProcessPoolExecutor, n: int) -> float:
    t0 = time.perf_counter()
    assert sum(pool.map(run_true, range(n), chunksize=1)) == 0
    return n / (time.perf_counter() - t0)


def dask_rate(client: Any, n: int) -> float:
    t0 = time.perf_counter()
    assert sum(client.gather(client.map(run_true, range(n), pure=False))) == 0
    return n / (time.perf_counter() - t0)


def dask_round_trip(client: Any, runs: int) -> float:
    lat = []
    for i in range(runs):
        t = time.perf_counter()
        client.submit(run_true, i, pure=False).result()
        lat.append(time.perf_counter() - t)
    return statistics.median(lat)


class Grid:
    """A coordinator and 2 worker nodes of 1 slot each, on 3 namespaced hosts, kept up between jobs."""

    def __init__(self, stack: ExitStack, work: Path, ce_broker: str) -> None:
        self.d = Path(tempfile.mkdtemp(dir=work))  # removed at the very end: see main()
        tb = stack.enter_context(Testbed(3, self.d / "tb"))
        self.key = self.d / "grid.key"
        GridKey.generate().write(self.key)
        self.procs = []
        for h in tb.hosts:
            args = ["--cpus", "1"] if h.index > 1 else ["--ce-broker", ce_broker]
            self.procs.append(h.spawn(bonjourgrid_argv("node", "--key-file", str(self.key), "--state-dir",
                                                       str(self.d / h.name), "--name", h.name, "--owner-cpu", "100",
                                                       *args), "node"))
        stack.callback(lambda: [p.stop() for p in self.procs])
        self.coord = tb.hosts[0]
        wait_for(self._nodes_seen, 60, 0.2, "three nodes")
        self.submit("--tasks", "20", "--", "true")  # warm up

    def _nodes_seen(self) -> bool:
        r = self.coord.run(bonjourgrid_argv("nodes", "--json", "--key-file", str(self.key), "--state-dir",
                                            str(self.d / "host1")))
        return r.returncode == 0 and len(json.loads(r.stdout)) == 3

    def submit(self, *args: str, timeout: float = 300) -> dict:
        """`bonjourgrid submit`, as a user runs it; returns the job's summary.json."""
        argv = bonjourgrid_argv("submit", "--json", "--key-file", str(self.key), "--state-dir", str(self.d / "host1"),
                                "--results", str(self.d / f"r{time.monotonic_ns()}"), *args)
        try:
            r = self.coord.run(argv, timeout=timeout)
        except subprocess.TimeoutExpired:
            r = None
        if r is None or r.returncode != 0:
            for p in self.procs:
                print(f"---- {p.argv[-1]} log tail\n{p.output()[-4000:]}", file=sys.stderr)
            raise RuntimeError(f"submit {' '.join(args)} failed: {r.stderr[-2000:] if r else 'timed out'}")
        return json.loads((Path(json.loads(r.stdout.splitlines()[-1])["results_dir"]) / "summary.json").read_text())

    def sweep(self, n: int) -> dict[str, float]:
        t0 = time.perf_counter()
        status = self.submit("--tasks", str(n), "--", "true")
        wall = time.perf_counter() - t0
        return {"wall": n / wall, "steady": n / (status["seconds"] - status["first_task_after"]),
                "first_task": status["first_task_after"], "outside_ce": wall - status["seconds"]}

    def latencies(self, runs: int) -> tuple[float, float]:
        """(task round trip in a running CE, 1-task job submit to results), medians."""
        job_lat, round_trips = [], []
        for _ in range(runs):
            t = time.perf_counter()
            one = self.submit("--tasks", "1", "--", "true")
            job_lat.append(time.perf_counter() - t)
            # In a 1-task job the task goes out as soon as a worker asks: from then to its result
            # recorded (durably) is one round trip through a running CE, as Dask's client.submit().result().
            round_trips.append(one["last_result_after"] - one["first_task_after"])
        return statistics.median(round_trips), statistics.median(job_lat)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=3, help="each system runs once per round, in turn")
    ap.add_argument("--latency-runs", type=int, default=200)
    a = ap.parse_args()
    rates: dict[str, list[float]] = {}
    bg_runs: dict[str, list[dict[str, float]]] = {"auto": [], "amqtt": []}
    with ExitStack() as stack:
        # Nothing is deleted until every system has run: on ext4 without a journal (this
        # project's VM) creating files within a minute or so of mass deletions costs up to ten
        # times more, which would charge one run's clean-up to the next one's results export.
        work = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        pool = stack.enter_context(ProcessPoolExecutor(2))
        list(pool.map(run_true, range(20)))  # warm up
        client = None
        try:
            from dask.distributed import Client, LocalCluster
        except ImportError:
            print("dask is not installed: no Dask rows (.venv/bin/pip install -e '.[bench]' adds it)", file=sys.stderr)
        else:
            cluster = stack.enter_context(LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                                       dashboard_address=None))
            client = stack.enter_context(Client(cluster))
            client.gather(client.map(run_true, range(20), pure=False))
        grids = {broker: Grid(stack, work, broker) for broker in bg_runs}
        # Interleaved, so that a slower minute of a shared machine is spread over every system.
        for _ in range(a.rounds):
            rates.setdefault("ppe", []).append(ppe_rate(pool, a.tasks))
            if client is not None:
                rates.setdefault("dask", []).append(dask_rate(client, a.tasks))
            for broker, grid in grids.items():
                bg_runs[broker].append(grid.sweep(a.tasks))
        dask_rt = dask_round_trip(client, a.latency_runs) if client is not None else None
        bg_rt, bg_job = grids["auto"].latencies(a.latency_runs)

    def med(runs: list[dict[str, float]], key: str) -> float:
        return statistics.median(r[key] for r in runs)

    ppe = statistics.median(rates["ppe"])
    dask = statistics.median(rates["dask"]) if "dask" in rates else None
    print(f"{a.tasks} tasks of `true`, 2 workers x 1 slot, this machine ({sys.platform}, {os.cpu_count()} cores);")
    print(f"medians of {a.rounds} rounds, each system once per round, in turn\n")
    print(f"{'system':44} {'tasks/s':>9} {'vs PPE':>7} {'vs Dask':>8}   range")
    rows = [("ProcessPoolExecutor(2)", rates["ppe"])]
    if dask:
        rows.append(("Dask LocalCluster(2 procs)", rates["dask"]))
    rows += [("BonjourGrid native, submit to results (wall)", [r["wall"] for r in bg_runs["auto"]]),
             ("BonjourGrid native, first to last task", [r["steady"] for r in bg_runs["auto"]]),
             ("  same, amqtt CE broker, submit to results", [r["wall"] for r in bg_runs["amqtt"]]),
             ("  same, amqtt CE broker, first to last task", [r["steady"] for r in bg_runs["amqtt"]])]
    for name, values in rows:
        rate = statistics.median(values)
        vs_dask = f"{rate / dask:.2f}x" if dask else "-"
        print(f"{name:44} {rate:9.0f} {rate / ppe:6.2f}x {vs_dask:>8}   {min(values):.0f}-{max(values):.0f}")
    print()
    if dask_rt is not None:
        print(f"{'Dask single-task round trip (median)':52} {dask_rt * 1000:8.1f} ms")
    print(f"{'BonjourGrid task round trip in a running CE (median)':52} {bg_rt * 1000:8.1f} ms")
    print(f"{'BonjourGrid 1-task job, submit to results (median)':52} {bg_job * 1000:8.0f} ms")
    print(f"{f'BonjourGrid {a.tasks}-task job outside the CE':52} {med(bg_runs['auto'], 'outside_ce') * 1000:8.0f} ms")
    print(f"{'  (CLI start-up, submit, teardown, result files)':52}")
    print(f"{'BonjourGrid submit to first task running':52} {med(bg_runs['auto'], 'first_task') * 1000:8.0f} ms")
    print(f"{'  same, amqtt CE broker':52} {med(bg_runs['amqtt'], 'first_task') * 1000:8.0f} ms")


if __name__ == "__main__":
    asyncio.set_event_loop_policy(None)
    main()
