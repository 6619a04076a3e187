"""The BOINC backend with Debian's real boinc-client on namespaced hosts (no mock of BOINC anywhere)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from test_ce import WORK_PY, all_idle, submit, write_job
from test_failover import results_recorded_once, who_coordinates

from bonjourgrid.testbed import bonjourgrid_argv, wait_for

pytestmark = [pytest.mark.middleware,
              pytest.mark.skipif(not shutil.which("boinc"), reason="boinc-client is not installed (scripts/setup.sh)")]

DATA = "some shared input data\n" * 1000

JOB = """
    name = "hash20"
    backend = "{backend}"
    inputs = ["work.py", {{ src = "data.txt", dest = "data.txt" }}]
    outputs = ["out-*.txt"]
    {extra}
    [sweep]
    argv = ["python3", "work.py", "{{i}}"]
    count = {count}
"""


def job_file(d: Path, backend: str, count: int = 20, extra: str = "") -> Path:
    return write_job(d, JOB.format(backend=backend, count=count, extra=extra), {"work.py": WORK_PY, "data.txt": DATA})


def expected(i: int) -> str:
    return f"{i} {hashlib.sha256(DATA.encode() + str(i).encode()).hexdigest()}\n"


def results_tree(res: Path) -> dict[str, bytes]:
    """Every output and stdout, by relative path: what must be identical across backends."""
    return {str(p.relative_to(res)): p.read_bytes() for p in sorted(res.rglob("*"))
            if p.is_file() and (p.name == "stdout" or "outputs" in p.parts)}


def first_task_after(node, job_name: str) -> float | None:
    r = node.cli("jobs", "--json")
    for j in json.loads(r.stdout) if r.returncode == 0 else []:
        if j.get("name") == job_name:
            return j.get("first_task_after")
    return None


def test_twenty_tasks_on_three_boinc_clients_match_the_native_backend(grid, tmp_path):
    g = grid(4)
    nodes = g.start_all()
    wait_for(lambda: len(nodes[0].sees()) == 4, 30, 0.2, "four nodes")
    timings = {}
    for backend in ("boinc", "native"):
        res = tmp_path / f"res-{backend}"
        t0 = time.monotonic()
        code, summary, stderr = submit(nodes[0], str(job_file(tmp_path / backend, backend)), "--results", str(res))
        full = json.loads((res / "summary.json").read_text()) if (res / "summary.json").exists() else {}
        timings[backend] = (time.monotonic() - t0, summary.get("first_task_after", full.get("first_task_after")))
        assert code == 0, stderr
        assert summary["state"] == "done" and summary["tasks_done"] == 20, summary
        assert summary["workers_used"] == 3
        for i in range(20):
            assert (res / f"{i:02d}" / "outputs" / f"out-{i}.txt").read_text() == expected(i)
            assert (res / f"{i:02d}" / "stdout").read_text() == f"task {i} ok\n"
        wait_for(lambda: all_idle(nodes), 30, 0.3, "every worker back to idle")
    assert results_tree(tmp_path / "res-boinc") == results_tree(tmp_path / "res-native")
    # the clients detached and stopped: no data dir of these nodes is left (others' runs may have theirs)
    ids = [n["id"] for n in nodes[0].view()[0]]
    assert not [p for i in ids for p in Path(tempfile.gettempdir()).glob(f"bg-boinc-{i[:8]}-*")]
    assert not [i for i in ids if boinc_clients(i)]
    print(f"\nFIGURES boinc: {timings['boinc'][0]:.1f}s total, first task after {timings['boinc'][1]}s; "
          f"native: {timings['native'][0]:.1f}s total, first task after {timings['native'][1]}s")


def test_quorum_rejects_a_tampering_worker(grid, tmp_path):
    """One honest and one tampering worker can never agree: the CE must keep going until a third node
    breaks every tie, though by then the core's queue is dry (every task is out)."""
    g = grid(4)
    h = g.testbed.hosts
    nodes = [g.start(h[0]), g.start(h[1])]
    # the fourth host is a malicious volunteer: its `python3` appends to every output the task writes.
    evil = Path(tempfile.mkdtemp(prefix="bgt-evil-"))
    evil.chmod(0o755)
    fake = evil / "python3"
    fake.write_text("#!/bin/sh\n/usr/bin/python3 \"$@\"; rc=$?\nfor f in out-*.txt; do echo forged >> \"$f\"; done\n"
                    "exit $rc\n")
    fake.chmod(0o755)
    try:
        state = tmp_path / f"{h[3].name}-evil-state"
        argv = bonjourgrid_argv("node", "--key-file", str(g.key_file), "--grid", "default", "--state-dir",
                                str(state), "--name", h[3].name, "--sample-interval", "0.5", "--log-level", "debug",
                                "--owner-cpu", "100")
        env = {**os.environ, "PATH": f"{evil}:{os.environ['PATH']}"}
        bad = h[3].spawn(argv, "node-evil", env=env)
        wait_for(lambda: len(nodes[0].sees()) == 3, 30, 0.2, "three nodes")
        res = tmp_path / "res"
        job = job_file(tmp_path / "job", "boinc", 6, "[backend_options]\n    replication = 2\n    quorum = 2")
        sub = nodes[0].host.spawn(nodes[0].cli_argv("submit", "--json", "--results", str(res), str(job)), "submit")

        def every_task_out() -> bool:
            r = nodes[0].cli("jobs", "--json")
            jobs = json.loads(r.stdout) if r.returncode == 0 else []
            return any(j["tasks_pending"] == 0 and j["tasks_running"] == 6 for j in jobs)

        wait_for(every_task_out, 120, 0.3, "every task handed out to the two first workers")
        nodes.append(g.start(h[2]))  # the only node able to break the ties
        wait_for(lambda: not sub.alive(), 300, 0.5, "the job to end")
        assert sub.popen.returncode == 0, sub.output()[-3000:]
        summary = json.loads((res / "summary.json").read_text())
        assert summary["state"] == "done" and summary["tasks_done"] == 6
        for i in range(6):
            assert (res / str(i) / "outputs" / f"out-{i}.txt").read_text() == expected(i)
        log = nodes[0].proc.output()
        assert "rejected (disagrees with the quorum)" in log
        assert "forged" not in "".join(p.read_text() for p in res.rglob("out-*.txt"))
    finally:
        shutil.rmtree(evil, ignore_errors=True)
        with_bad = locals().get("bad")
        if with_bad is not None:
            with_bad.stop()


def test_a_killed_client_has_its_task_reissued(grid, tmp_path):
    g = grid(3)
    nodes = g.start_all()
    wait_for(lambda: len(nodes[0].sees()) == 3, 30, 0.2, "three nodes")
    job = write_job(tmp_path / "job", """
        name = "sleepy"
        backend = "boinc"
        [sweep]
        argv = ["sh", "-c", "sleep 3; echo done {i}"]
        count = 6
    """)
    res = tmp_path / "res"
    proc = nodes[0].host.spawn(nodes[0].cli_argv("submit", "--json", "--results", str(res), str(job)), "submit")
    victim = nodes[1].host.name  # a worker (nodes[0] coordinates)
    victim_id = next(n["id"] for n in nodes[0].view()[0] if n["host"] == victim)

    def victim_running_a_task() -> int | None:
        pattern = f"boinc --dir /tmp/bg-boinc-{victim_id[:8]}"
        r = subprocess.run(["pgrep", "-f", "--", pattern], capture_output=True, text=True)
        pids = [int(p) for p in r.stdout.split()]
        for pid in pids:
            kids = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
            for kid in kids:
                with contextlib.suppress(OSError):
                    if b"bgtask" in Path(f"/proc/{kid}/cmdline").read_bytes():  # the wrapper app runs a task
                        return pid
        return None

    pid = wait_for(victim_running_a_task, 90, 0.2, f"a task running on {victim}'s client")
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not proc.alive(), 180, 0.5, "the job to end")
    assert proc.popen.returncode == 0, proc.output()[-3000:]
    summary = json.loads((res / "summary.json").read_text())
    assert summary["state"] == "done" and summary["tasks_done"] == 6
    assert any(t["attempts"] > 1 for t in summary["tasks"])  # the killed client's task ran again
    for i in range(6):
        assert (res / str(i) / "stdout").read_text() == f"done {i}\n"
    assert "lost" in nodes[0].proc.output()


def boinc_clients(node_id: str) -> list[int]:
    """PIDs of the boinc clients a node's worker half started (their data dirs are named after the node)."""
    r = subprocess.run(["pgrep", "-f", "--", f"boinc --dir /tmp/bg-boinc-{node_id[:8]}-"], capture_output=True,
                       text=True, check=False)
    return [int(p) for p in r.stdout.split()]


def kill_host_but(host, keep: int) -> None:
    """SIGKILL every process of a namespaced host (node daemon, broker, project server) but `keep`."""
    pids = subprocess.run(["ip", "netns", "pids", host.netns], capture_output=True, text=True,
                          check=False).stdout.split()
    for pid in pids:
        with contextlib.suppress(OSError, ValueError):
            if int(pid) != keep and b"submit" not in Path(f"/proc/{pid}/cmdline").read_bytes():
                os.kill(int(pid), signal.SIGKILL)


def test_coordinator_killed_the_successor_serves_the_project_and_the_clients_carry_on(grid, tmp_path):
    """Issue 5's last point: the successor serves the same project; the clients keep their tasks."""
    g = grid(4)
    nodes = g.start_all("--cpus", "2", "--failover-timeout", "1", "--lease", "6")
    wait_for(lambda: len(nodes[0].sees()) == 4, 30, 0.2, "four nodes")
    ids = {n["host"]: n["id"] for n in nodes[0].view()[0]}
    job = write_job(tmp_path / "job", """
        name = "hash-failover"
        backend = "boinc"
        inputs = ["work.py", { src = "data.txt", dest = "data.txt" }]
        outputs = ["out-*.txt"]
        [sweep]
        argv = ["sh", "-c", "sleep 2; exec python3 work.py {i}"]
        count = 20
    """, {"work.py": WORK_PY, "data.txt": DATA})
    res = tmp_path / "res"
    sub = nodes[0].host.spawn(nodes[0].cli_argv("submit", "--wait", "--json", "--results", str(res), str(job)),
                              "submit")

    def done() -> int:
        r = nodes[0].cli("jobs", "--json")
        return max((j["tasks_done"] for j in json.loads(r.stdout)), default=0) if r.returncode == 0 else 0

    wait_for(lambda: done() >= 3, 180, 0.3, "a few tasks done")
    workers = nodes[1:]
    clients = {n.host.name: boinc_clients(ids[n.host.name]) for n in workers}
    assert all(len(pids) == 1 for pids in clients.values()), clients
    kill_host_but(nodes[0].host, sub.pid)
    killed = time.monotonic()
    successor = wait_for(lambda: who_coordinates(workers), 30, 0.2, "a successor")
    wait_for(lambda: "first result accepted after the takeover" in successor.proc.output(), 120, 0.1,
             "the successor's first result")
    first = time.monotonic() - killed
    # The clients carried on: same processes, and the replicas they held were adopted, not sent again.
    assert {n.host.name: boinc_clients(ids[n.host.name]) for n in workers} == clients
    assert "adopted replica" in successor.proc.output()
    wait_for(lambda: not sub.alive(), 300, 0.5, "submit to follow the CE and end")
    assert sub.popen.returncode == 0, sub.output()[-3000:]
    assert "following" in sub.output()
    summary = json.loads((res / "summary.json").read_text())
    assert summary["state"] == "done" and summary["tasks_done"] == 20, summary.get("message")
    for i in range(20):
        assert (res / f"{i:02d}" / "outputs" / f"out-{i}.txt").read_text() == expected(i)
        assert (res / f"{i:02d}" / "stdout").read_text() == f"task {i} ok\n"
    results_recorded_once(successor, summary["job"], 20)
    wait_for(lambda: set(successor.sees().get(n.host.name) for n in workers) == {"idle"}, 30, 0.3,
             "the workers back to idle")
    wait_for(lambda: not any(boinc_clients(i) for i in ids.values()), 30, 0.3, "every boinc client gone")
    left = [p for i in ids.values() for p in Path(tempfile.gettempdir()).glob(f"bg-boinc-{i[:8]}-*")]
    assert not left, left
    log = successor.proc.output()
    handed = sum(n.proc.output().count("handed to the new coordinator") for n in workers)
    print(f"\nFIGURES boinc failover: first result {first:.1f}s after the kill, {log.count('adopted replica')} "
          f"replica(s) adopted, {handed} output(s) handed over, "
          f"{log.count('came back without output') + log.count('no longer has replica')} replica(s) lost")
