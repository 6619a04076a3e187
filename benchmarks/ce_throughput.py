"""BonjourGrid's native backend against ProcessPoolExecutor and Dask, side by side, on this machine.

Tasks run `true`. BonjourGrid: a coordinator and 2 worker nodes of 1 slot each, each in its own
namespaced host (needs root). Baselines: ProcessPoolExecutor(2) and a Dask LocalCluster of 2
single-threaded worker processes, both running `subprocess.run(["true"])`.

BonjourGrid runs with its default CE broker (Mosquitto, which scripts/setup.sh installs), and
again with the built-in amqtt (`node --ce-broker amqtt`, what a desktop without Mosquitto gets).

Usage: python benchmarks/ce_throughput.py [--tasks 2000] [--latency-runs 200]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from bonjourgrid.gridkey import GridKey
from bonjourgrid.testbed import Testbed, bonjourgrid_argv, wait_for


def run_true(_: int = 0) -> int:
    return subprocess.run(["true"], check=False).returncode


def bench_ppe(n: int) -> float:
    with ProcessPoolExecutor(2) as pool:
        list(pool.map(run_true, range(20)))  # warm up
        t0 = time.perf_counter()
        assert sum(pool.map(run_true, range(n), chunksize=1)) == 0
        return n / (time.perf_counter() - t0)


def bench_dask(n: int, latency_runs: int) -> tuple[float, float] | None:
    try:
        from dask.distributed import Client, LocalCluster
    except ImportError:
        return None
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        client.gather(client.map(run_true, range(20), pure=False))
        t0 = time.perf_counter()
        assert sum(client.gather(client.map(run_true, range(n), pure=False))) == 0
        rate = n / (time.perf_counter() - t0)
        lat = []
        for i in range(latency_runs):
            t = time.perf_counter()
            client.submit(run_true, i, pure=False).result()
            lat.append(time.perf_counter() - t)
        return rate, statistics.median(lat)


def bench_bonjourgrid(work: Path, n: int, latency_runs: int, ce_broker: str = "auto") -> dict[str, float]:
    d = tempfile.mkdtemp(dir=work)  # removed at the very end: see main()
    with Testbed(3, Path(d) / "tb") as tb:
        key = Path(d) / "grid.key"
        GridKey.generate().write(key)
        procs = []
        for h in tb.hosts:
            args = ["--cpus", "1"] if h.index > 1 else ["--ce-broker", ce_broker]
            procs.append(h.spawn(bonjourgrid_argv("node", "--key-file", str(key), "--state-dir", str(Path(d) / h.name),
                                                  "--name", h.name, "--owner-cpu", "100",
                                                  *args), "node"))
        coord = tb.hosts[0]

        def cli(*args: str, timeout: float = 300) -> dict:
            argv = bonjourgrid_argv("submit", "--json", "--key-file", str(key), "--state-dir", str(Path(d) / "host1"),
                                    "--results", str(Path(d) / f"r{time.monotonic_ns()}"), *args)
            try:
                r = coord.run(argv, timeout=timeout)
            except subprocess.TimeoutExpired:
                r = None
            if r is None or r.returncode != 0:
                for p in procs:
                    print(f"---- {p.argv[-1]} log tail\n{p.output()[-4000:]}", file=sys.stderr)
                raise RuntimeError(f"submit {' '.join(args)} failed: {r.stderr[-2000:] if r else 'timed out'}")
            return json.loads(r.stdout.splitlines()[-1])

        def nodes_seen() -> bool:
            r = coord.run(bonjourgrid_argv("nodes", "--json", "--key-file", str(key), "--state-dir",
                                           str(Path(d) / "host1")))
            return r.returncode == 0 and len(json.loads(r.stdout)) == 3

        wait_for(nodes_seen, 60, 0.2, "three nodes")
        cli("--tasks", "20", "--", "true")  # warm up
        t0 = time.perf_counter()
        s = cli("--tasks", str(n), "--", "true")
        wall = time.perf_counter() - t0
        status = json.loads((Path(s["results_dir"]) / "summary.json").read_text())
        steady = n / (status["seconds"] - status["first_task_after"])
        job_lat, round_trips = [], []
        for _ in range(latency_runs):
            t = time.perf_counter()
            one = cli("--tasks", "1", "--", "true")
            job_lat.append(time.perf_counter() - t)
            st1 = json.loads((Path(one["results_dir"]) / "summary.json").read_text())
            # In a 1-task job the task goes out as soon as a worker asks: from then to its result
            # recorded (durably) is one round trip through a running CE, as Dask's client.submit().result().
            round_trips.append(st1["last_result_after"] - st1["first_task_after"])
        for p in procs:
            p.stop()
        return {
            "rate_wall": n / wall,
            "rate_steady": steady,
            "first_task": status["first_task_after"],
            "outside_ce": wall - status["seconds"],
            "task_round_trip": statistics.median(round_trips) if round_trips else float("nan"),
            "job_latency": statistics.median(job_lat) if job_lat else float("nan"),
        }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks", type=int, default=2000)
    ap.add_argument("--latency-runs", type=int, default=200)
    a = ap.parse_args()
    ppe = bench_ppe(a.tasks)
    dask = bench_dask(a.tasks, a.latency_runs)
    # Nothing is deleted until both grids have run: on ext4 without a journal (this project's VM)
    # creating files within a minute or so of mass deletions costs up to ten times more, which
    # would charge the first run's clean-up to the second run's results export.
    with tempfile.TemporaryDirectory() as work:
        bg = bench_bonjourgrid(Path(work), a.tasks, a.latency_runs)
        amqtt = bench_bonjourgrid(Path(work), a.tasks, 0, ce_broker="amqtt")
    print(f"{a.tasks} tasks of `true`, 2 workers x 1 slot, this machine ({sys.platform}, 2 cores)\n")
    print(f"{'system':44} {'tasks/s':>9} {'vs PPE':>7} {'vs Dask':>8}")
    rows = [("ProcessPoolExecutor(2)", ppe)]
    if dask:
        rows.append(("Dask LocalCluster(2 procs)", dask[0]))
    rows += [("BonjourGrid native, submit to results (wall)", bg["rate_wall"]),
             ("BonjourGrid native, first to last task", bg["rate_steady"]),
             ("  same, amqtt CE broker, submit to results", amqtt["rate_wall"]),
             ("  same, amqtt CE broker, first to last task", amqtt["rate_steady"])]
    for name, rate in rows:
        vs_dask = f"{rate / dask[0]:.2f}x" if dask else "-"
        print(f"{name:44} {rate:9.0f} {rate / ppe:6.2f}x {vs_dask:>8}")
    print()
    if dask:
        print(f"{'Dask single-task round trip (median)':52} {dask[1] * 1000:8.1f} ms")
    print(f"{'BonjourGrid task round trip in a running CE (median)':52} {bg['task_round_trip'] * 1000:8.1f} ms")
    print(f"{'BonjourGrid 1-task job, submit to results (median)':52} {bg['job_latency'] * 1000:8.0f} ms")
    print(f"{f'BonjourGrid {a.tasks}-task job outside the CE':52} {bg['outside_ce'] * 1000:8.0f} ms")
    print(f"{'  (CLI start-up, submit, teardown, result files)':52}")
    print(f"{'BonjourGrid submit to first task running':52} {bg['first_task'] * 1000:8.0f} ms")
    print(f"{'  same, amqtt CE broker':52} {amqtt['first_task'] * 1000:8.0f} ms")


if __name__ == "__main__":
    asyncio.set_event_loop_policy(None)
    main()
