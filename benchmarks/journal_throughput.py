"""How many results per second the journal makes durable, one commit each versus group commit.

Each commit is an fsync of the WAL (synchronous=FULL), so one-by-one throughput is bounded by
the disk's fsync latency; batching amortises it. Also measures how fast a replica applies the
resulting change stream. Run from the repository root:

    PYTHONPATH=. python benchmarks/journal_throughput.py [--n 10000] [--dir /path/on/the/real/disk]

Put --dir on the disk the coordinator's state will live on: a tmpfs makes fsync free and the
figures meaningless.
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
import time
from pathlib import Path

from bonjourgrid.journal import Journal, OutputFile, ResultRecord


def _prepare(path: Path, n: int) -> Journal:
    """A job of n tasks, all running (setup, not timed)."""
    j = Journal.open(path)
    j.create_job("bench", {"cmd": ["true"]}, [{"i": i} for i in range(n)], submitter="bench", created_at=0.0)
    with j.batch():
        for i in range(n):
            j.mark_running("bench", i, f"node{i % 16}", 1.0)
    return j


def _result(i: int) -> ResultRecord:
    return ResultRecord(
        exit_code=0,
        started_at=1.0,
        finished_at=2.0,
        node_id=f"node{i % 16}",
        attempt=1,
        stdout=b"x" * 200,
        stderr=b"",
        outputs=(OutputFile(f"out/{i}.dat", 1024, "0" * 64),),
        extra={"cpu_s": 0.5},
    )


def bench_record(path: Path, n: int, batch: int) -> tuple[float, Journal]:
    j = _prepare(path, n)
    results = [_result(i) for i in range(n)]
    t0 = time.perf_counter()
    for start in range(0, n, batch):
        with j.batch() if batch > 1 else contextlib.nullcontext():
            for i in range(start, min(start + batch, n)):
                j.record_result("bench", i, results[i])
    return time.perf_counter() - t0, j


def bench_apply(primary: Journal, path: Path, chunk: int) -> tuple[float, int]:
    replica = Journal.open(path)
    t0 = time.perf_counter()
    while replica.last_seq() < primary.last_seq():
        replica.apply(primary.changes_since(replica.last_seq(), limit=chunk))
    elapsed = time.perf_counter() - t0
    n = replica.last_seq()
    replica.close()
    return elapsed, n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=10_000, help="results per run")
    ap.add_argument("--dir", type=Path, default=None, help="where to put the databases (default: a temp dir)")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 10, 100, 1000], help="results per transaction")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        root = Path(tmp)
        print(f"{args.n} results, WAL + synchronous=FULL, databases in {root}")
        print(f"{'results/txn':>12} {'seconds':>9} {'results/s':>11} {'ms/commit':>10}")
        last: Journal | None = None
        for b in args.batches:
            elapsed, j = bench_record(root / f"b{b}.db", args.n, b)
            commits = -(-args.n // b)
            print(f"{b:>12} {elapsed:>9.2f} {args.n / elapsed:>11.0f} {1000 * elapsed / commits:>10.2f}")
            if last is not None:
                last.close()
            last = j
        assert last is not None
        size_mb = sum(p.stat().st_size for p in root.glob(f"b{args.batches[-1]}.db*")) / 1e6
        print(f"database + WAL after the last run: {size_mb:.1f} MB, {last.last_seq()} changes")
        elapsed, n = bench_apply(last, root / "replica.db", 1000)
        print(f"replica apply, chunks of 1000: {n} changes in {elapsed:.2f} s = {n / elapsed:.0f} changes/s")
        last.close()


if __name__ == "__main__":
    main()
