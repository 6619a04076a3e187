"""The HTCondor backend against real HTCondor daemons (Debian trixie's, in a cached chroot) on namespaced hosts."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from test_ce import WORK_PY, submit, write_job

from bonjourgrid import backend
from bonjourgrid.testbed import Host, _kill_netns_pids, wait_for

ROOT = Path(__file__).resolve().parents[2]
CHROOT = ROOT / "scripts" / "condor-chroot.sh"

pytestmark = [pytest.mark.netns, pytest.mark.middleware]


@pytest.fixture(scope="session")
def condor_root() -> Path:
    """The cached trixie root with condor (built by scripts/condor-root.sh on first use, about a minute)."""
    if os.geteuid() != 0:
        pytest.skip("HTCondor's daemons run in a Debian trixie chroot: building and entering it needs root")
    if "condor" not in backend.available():
        pytest.skip("the condor backend is not installed (pip install -e backends/condor, done by scripts/setup.sh)")
    r = subprocess.run(["bash", str(ROOT / "scripts" / "condor-root.sh")], capture_output=True, text=True,
                       timeout=1800, check=False)
    if r.returncode != 0:
        pytest.fail(f"scripts/condor-root.sh failed:\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}")
    return Path(r.stdout.strip().splitlines()[-1])


@pytest.fixture
def condor(condor_root: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Node daemons started after this run Condor from the chroot."""
    monkeypatch.setenv("BONJOURGRID_CONDOR_PREFIX", f"{CHROOT} {condor_root}")
    return condor_root


def job_file(d: Path, count: int, data: str) -> Path:
    return write_job(d, f"""
        name = "hash{count}"
        inputs = ["work.py", {{ src = "data.txt", dest = "in/data.txt" }}]
        outputs = ["out-*.txt"]
        [sweep]
        argv = ["python3", "work.py", "{{i}}"]
        count = {count}
    """, {"work.py": WORK_PY.replace('open("data.txt"', 'open("in/data.txt"'), "data.txt": data})


def test_thirty_tasks_through_condor_match_the_native_backend(grid, condor, tmp_path):
    g = grid(3)
    nodes = g.start_all("--cpus", "2")
    wait_for(lambda: len(nodes[0].sees()) == 3, 30, 0.2, "three nodes")
    data = "shared input for condor\n" * 500
    runs = {}
    job = job_file(tmp_path / "job", 30, data)  # one job file, run on each backend
    for name in ("condor", "native"):
        res = tmp_path / f"res-{name}"
        code, summary, stderr = submit(nodes[0], str(job), "--backend", name, "--results", str(res))
        assert code == 0, stderr
        assert summary["state"] == "done" and summary["tasks_done"] == 30, summary
        assert summary["workers_used"] == 2
        runs[name] = (res, summary)
        wait_for(lambda: set(nodes[0].sees().values()) == {"idle"}, 30, 0.3, "every node idle again")
    for i in range(30):
        expected = f"{i} {hashlib.sha256(data.encode() + str(i).encode()).hexdigest()}\n"
        tc, tn = runs["condor"][0] / f"{i:02d}", runs["native"][0] / f"{i:02d}"
        assert (tc / "outputs" / f"out-{i}.txt").read_text() == expected
        assert (tc / "stdout").read_bytes() == (tn / "stdout").read_bytes() == f"task {i} ok\n".encode()
        assert sorted(p.name for p in (tc / "outputs").iterdir()) == sorted(p.name for p in (tn / "outputs").iterdir())
        for f in (tn / "outputs").iterdir():
            assert (tc / "outputs" / f.name).read_bytes() == f.read_bytes()
        rc = json.loads((tc / "result.json").read_text())
        assert rc["exit_code"] == 0 and rc["state"] == "done"
    ran_on = {t["node"] for t in json.loads((runs["condor"][0] / "summary.json").read_text())["tasks"]}
    assert len(ran_on) == 2 and nodes[0].view()[0]  # both workers, not the coordinator
    c, n = (json.loads((runs[k][0] / "summary.json").read_text()) for k in ("condor", "native"))
    print(f"\nFIGURES condor: first task after {c['first_task_after']}s, total {c['seconds']}s; "
          f"native: first task after {n['first_task_after']}s, total {n['seconds']}s; "
          f"overhead per task (4 slots): {(c['seconds'] - n['seconds']) / 30 * 4:.3f}s")
    # The pool is gone with the job: no daemon and no directory left behind (workers stop theirs
    # in the background after going back to Idle: allow them a few seconds).
    for node in nodes:
        wait_for(lambda node=node: "condor_" not in _cmdlines(node.host), 30, 0.3, "condor daemons to stop")
        assert not list(node.state_dir.rglob("condor_config"))


def _cmdlines(host: Host) -> str:
    return "\n".join(host.processes().values())


def test_a_killed_worker_host_has_its_jobs_rerun_elsewhere(grid, condor, tmp_path):
    g = grid(3)
    nodes = g.start_all("--cpus", "2")
    wait_for(lambda: len(nodes[0].sees()) == 3, 30, 0.2, "three nodes")
    job = write_job(tmp_path / "job", """
        name = "sleepy"
        backend = "condor"
        [sweep]
        argv = ["sh", "-c", "sleep 2; echo done {i}"]
        count = 20
    """)
    res = tmp_path / "res"
    sub = nodes[0].host.spawn(nodes[0].cli_argv("submit", "--json", str(job), "--results", str(res)), "submit")
    victim = nodes[2].host
    wait_for(lambda: "sleep 2" in _cmdlines(victim), 90, 0.2, "a Condor job running on the victim")
    time.sleep(1)
    _kill_netns_pids(victim.netns)  # node daemon, condor_master, startd, starters, jobs: SIGKILL all
    wait_for(lambda: not sub.alive(), 240, 0.5, "the job to end")
    assert sub.popen.returncode == 0, sub.output()[-3000:]
    summary = json.loads((res / "summary.json").read_text())
    assert summary["state"] == "done" and summary["tasks_done"] == 20
    for i in range(20):
        assert (res / f"{i:02d}" / "stdout").read_text() == f"done {i}\n"
    survivor = next(n["id"] for n in nodes[0].view()[0] if n["host"] == nodes[1].host.name)
    tasks = summary["tasks"]
    assert any(t["attempts"] > 1 and t["node"] == survivor for t in tasks), tasks  # reruns landed on the survivor


QUERY = textwrap.dedent("""
    import json, os, sys
    os.environ["CONDOR_CONFIG"] = sys.argv[1]
    import htcondor2
    try:
        ads = htcondor2.Collector(sys.argv[2]).query(htcondor2.AdType.Startd, projection=["BgNode"])
        print(json.dumps(sorted(str(a.get("BgNode")) for a in ads)))
    except Exception as e:
        print(json.dumps({"error": str(e)}))
""")


def test_a_host_without_the_grid_key_cannot_join_the_pool(grid, condor, tmp_path):
    from bonjourgrid_condor import config as cfg
    from bonjourgrid_condor.daemons import write_password

    g = grid(3)
    h = g.testbed.hosts
    nodes = [g.start(h[0]), g.start(h[1], "--cpus", "2")]  # host2 runs no node: it plays the intruder
    wait_for(lambda: len(nodes[0].sees()) == 2, 30, 0.2, "two nodes")
    job = write_job(tmp_path / "job", """
        name = "guarded"
        backend = "condor"
        [sweep]
        argv = ["sh", "-c", "sleep 1; echo {i}"]
        count = 16
    """)
    res = tmp_path / "res"
    sub = nodes[0].host.spawn(nodes[0].cli_argv("submit", "--json", str(job), "--results", str(res)), "submit")
    wait_for(lambda: list(nodes[0].state_dir.rglob("client/tokens.d")), 60, 0.2, "the CE's pool")
    client = next(nodes[0].state_dir.rglob("client/condor_config"))
    collector = f"{h[0].ip}:9618"

    bad = tmp_path / "intruder"
    for sub_dir in ("log", "spool", "execute", "lock", "run"):
        (bad / sub_dir).mkdir(parents=True, exist_ok=True)
    write_password(bad / "passwords.d", hashlib.sha256(b"some other grid").digest())
    (bad / "condor_config").write_text(cfg.worker_config(bad, collector, h[2].ip, 9618, bad / "passwords.d",
                                                         cpus=2, memory_mib=1024, node_id="intruder"))
    (bad / "client").write_text(cfg.client_config(collector, bad / "passwords.d", bad / "no-tokens"))
    intruder = h[2].spawn([str(CHROOT), str(condor), "condor_master", "-f"], "intruder",
                            env={"CONDOR_CONFIG": str(bad / "condor_config"),
                                 "BONJOURGRID_CONDOR_BIND": str(bad)})
    try:
        time.sleep(12)  # several update intervals of the intruder's startd
        q = tmp_path / "query.py"
        q.write_text(QUERY)
        seen = json.loads(h[0].run([sys.executable, str(q), str(client), collector], timeout=60).stdout)
        assert "intruder" not in seen, seen
        assert len(seen) >= 1, seen  # the legitimate worker's startd is there
        refused = json.loads(h[2].run([sys.executable, str(q), str(bad / "client"), collector], timeout=60).stdout)
        assert "error" in refused, refused  # without the key one cannot even read the pool
        start_log = (bad / "log" / "StartLog").read_text(errors="replace")
        assert "Failed to send update" in start_log or "failed" in start_log.lower()
    finally:
        intruder.signal(signal.SIGQUIT)
        wait_for(lambda: not intruder.alive(), 30, 0.3, "the intruder to stop")
    wait_for(lambda: not sub.alive(), 180, 0.5, "the job to end")
    assert sub.popen.returncode == 0, sub.output()[-3000:]
    summary = json.loads((res / "summary.json").read_text())
    worker = next(n["id"] for n in nodes[0].view()[0] if n["host"] == h[1].name)
    assert {t["node"] for t in summary["tasks"]} == {worker}


def test_failures_are_retried_and_a_timeout_is_reported(grid, condor, tmp_path):
    g = grid(2)
    nodes = g.start_all("--cpus", "2")
    wait_for(lambda: len(nodes[0].sees()) == 2, 30, 0.2, "two nodes")
    job = write_job(tmp_path / "job", """
        name = "flaky-condor"
        backend = "condor"
        retries = 1
        timeout = "4s"
        [[task]]
        argv = ["sh", "-c", "echo fine"]
        [[task]]
        argv = ["sh", "-c", "echo boom >&2; exit 3"]
        [[task]]
        argv = ["sleep", "60"]
    """)
    res = tmp_path / "res"
    code, summary, stderr = submit(nodes[0], str(job), "--results", str(res))
    assert code == 1, stderr
    assert summary["state"] == "failed" and summary["tasks_done"] == 1 and summary["tasks_failed"] == 2
    assert (res / "0" / "stdout").read_text() == "fine\n"
    failed = json.loads((res / "1" / "result.json").read_text())
    assert failed["state"] == "failed" and failed["exit_code"] == 3 and failed["attempts"] == 2
    assert (res / "1" / "stderr").read_text() == "boom\n"
    slow = json.loads((res / "2" / "result.json").read_text())
    assert slow["state"] == "failed" and slow["attempts"] == 2 and slow["timed_out"] is True, slow
    assert "allowed execute duration" in slow["error"]


def test_cancel_removes_the_jobs_and_tears_the_pool_down(grid, condor, tmp_path):
    g = grid(2)
    nodes = g.start_all("--cpus", "2")
    wait_for(lambda: len(nodes[0].sees()) == 2, 30, 0.2, "two nodes")
    job = write_job(tmp_path / "job", """
        name = "long-condor"
        backend = "condor"
        [sweep]
        argv = ["sleep", "300"]
        count = 4
    """)
    sub = nodes[0].host.spawn(nodes[0].cli_argv("submit", "--json", str(job)), "submit")
    wait_for(lambda: "sleep 300" in _cmdlines(nodes[1].host), 90, 0.2, "tasks running on the worker")
    ce_dir = next(nodes[0].state_dir.rglob("client/tokens.d")).parents[2]
    r = nodes[0].cli("cancel", ce_dir.name)
    assert r.returncode == 0, r.stderr
    wait_for(lambda: not sub.alive(), 60, 0.3, "submit to return")
    for node in nodes:  # daemons and jobs gone, directories removed
        wait_for(lambda node=node: not any(s in _cmdlines(node.host) for s in ("condor_", "sleep 300")),
                 30, 0.3, "Condor daemons and jobs to stop")
    assert not (ce_dir / "condor").exists()
    wait_for(lambda: set(nodes[0].sees().values()) == {"idle"}, 30, 0.3, "both nodes idle again")
    # A new pool on the same hosts and port (fresh key, fresh sessions) works right after.
    code, summary, stderr = submit(nodes[0], "--backend", "condor", "--tasks", "4", "--", "echo", "again {i}")
    assert code == 0 and summary["tasks_done"] == 4, stderr


def test_missing_condor_daemons_fail_the_job_clearly(grid, condor_root, tmp_path, monkeypatch):
    monkeypatch.setenv("BONJOURGRID_CONDOR_PREFIX", str(tmp_path / "no-such-condor"))
    g = grid(2)
    nodes = g.start_all()
    wait_for(lambda: len(nodes[0].sees()) == 2, 30, 0.2, "two nodes")
    code, _summary, stderr = submit(nodes[0], "--backend", "condor", "--tasks", "2", "--", "echo", "{i}", timeout=120)
    assert code != 0
    assert "cannot run HTCondor" in stderr and "BONJOURGRID_CONDOR_PREFIX" in stderr, stderr
    wait_for(lambda: set(nodes[0].sees().values()) == {"idle"}, 30, 0.3, "both nodes idle again")


def _states(host: Host, needle: str) -> list[str]:
    """Process states (R, S, T...) of the processes on a host whose command line contains `needle`."""
    out = []
    for pid, cmdline in host.processes().items():
        with contextlib.suppress(OSError):
            if needle in cmdline:
                out.append(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0])
    return out


def test_a_busy_owner_suspends_the_running_task_and_it_resumes_after(grid, condor, tmp_path):
    """The owner policy on a live startd: BgOwnerBusy, set as the worker half sets it, drives SUSPEND/CONTINUE."""
    g = grid(2)
    nodes = g.start_all("--cpus", "1")
    wait_for(lambda: len(nodes[0].sees()) == 2, 30, 0.2, "two nodes")
    sub = nodes[0].host.spawn(nodes[0].cli_argv("submit", "--json", "--backend", "condor", "--results",
                                                str(tmp_path / "res"), "--tasks", "1", "--",
                                                "sh", "-c", "sleep 8; echo finished"), "submit")
    wait_for(lambda: "sleep 8" in _cmdlines(nodes[1].host), 90, 0.2, "the task running on the worker")
    owner = next(nodes[1].state_dir.rglob("owner.config"))

    def set_owner(busy: bool) -> None:  # what the worker half does when the node's owner state flips
        owner.write_text(f"BgOwnerBusy = {busy}\n")
        r = nodes[1].host.run([str(CHROOT), str(condor), "condor_reconfig", "-daemon", "startd"],
                              env={"CONDOR_CONFIG": str(owner.parent / "condor_config"),
                                   "BONJOURGRID_CONDOR_BIND": str(owner.parent)})
        assert r.returncode == 0, r.stdout + r.stderr

    set_owner(True)
    def stopped() -> bool:  # the task's shell and its sleep, both stopped
        states = _states(nodes[1].host, "sleep 8")
        return bool(states) and set(states) == {"T"}

    wait_for(stopped, 30, 0.2, "the task to be suspended")
    time.sleep(4)
    assert stopped()  # still suspended while the owner is busy
    set_owner(False)
    wait_for(lambda: not sub.alive(), 90, 0.3, "the job to end")
    assert sub.popen.returncode == 0, sub.output()[-3000:]
    assert (tmp_path / "res" / "0" / "stdout").read_text() == "finished\n"
    result = json.loads((tmp_path / "res" / "0" / "result.json").read_text())
    assert result["attempts"] == 1  # suspended and resumed in place, not vacated and rerun


def test_coordinator_killed_a_successor_builds_a_new_pool_and_finishes(grid, condor, tmp_path):
    """Issue 4 with Condor: the successor resubmits the tasks without a recorded result to a pool of its own."""
    g = grid(4)
    nodes = g.start_all("--cpus", "1", "--failover-timeout", "1", "--lease", "6")
    wait_for(lambda: len(nodes[0].sees()) == 4, 30, 0.2, "four nodes")
    res = tmp_path / "res"
    sub = nodes[0].host.spawn(nodes[0].cli_argv(
        "submit", "--json", "--backend", "condor", "--results", str(res), "--tasks", "12", "--output", "out.txt",
        "--", "sh", "-c", "sleep 1; echo {i} > out.txt; echo t{i}"), "submit")

    def done() -> int:
        r = nodes[0].cli("jobs", "--json")
        return max((j["tasks_done"] for j in json.loads(r.stdout)), default=0) if r.returncode == 0 else 0

    wait_for(lambda: done() >= 3, 120, 0.3, "a part of the job to be done")
    # The coordinator host dies: node daemon, its broker and its Condor pool (not the submit command).
    for pid, cmdline in nodes[0].host.processes().items():
        if pid != sub.pid and "submit" not in cmdline:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not sub.alive(), 240, 0.5, "submit to follow the CE and end")
    assert sub.popen.returncode == 0, sub.output()[-3000:]
    summary = json.loads((res / "summary.json").read_text())
    assert summary["state"] == "done" and summary["tasks_done"] == 12, summary.get("message")
    for i in range(12):
        assert (res / f"{i:02d}" / "stdout").read_text() == f"t{i}\n"
        assert (res / f"{i:02d}" / "outputs" / "out.txt").read_text() == f"{i}\n"
