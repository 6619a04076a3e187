"""Computing elements with the native backend, on namespaced hosts with real node daemons and brokers."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import sqlite3
import sys
import textwrap
import time
from pathlib import Path

from conftest import GridNode, grow, last_summary, small_disk

from bonjourgrid.envelope import Envelope, seal
from bonjourgrid.gridkey import GridKey
from bonjourgrid.testbed import HASH_TASK_PY as WORK_PY
from bonjourgrid.testbed import wait_for


def write_job(d: Path, body: str, files: dict[str, str] | None = None) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    for name, text in (files or {}).items():
        (d / name).write_text(text)
    job = d / "job.toml"
    job.write_text(textwrap.dedent(body))
    return job


def submit(node: GridNode, *args: str, timeout: float = 480) -> tuple[int, dict, str]:
    """Run `bonjourgrid submit --json ...` on a node's host; (exit code, summary, stderr)."""
    r = node.cli("submit", "--json", *args, timeout=timeout)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
    return r.returncode, (json.loads(lines[-1]) if lines else {}), r.stderr


def all_idle(nodes: list[GridNode]) -> bool:
    states = nodes[0].sees()
    return len(states) == len(nodes) and set(states.values()) == {"idle"}


def a_job_says(node: GridNode, text: str) -> bool:
    """`text` is in the status message of a job the node lists."""
    r = node.cli("jobs", "--json")
    return r.returncode == 0 and any(text in j["message"] for j in json.loads(r.stdout))


def test_200_tasks_with_inputs_and_outputs_on_five_hosts(grid, tmp_path):
    g = grid(5)
    nodes = g.start_all("--cpus", "2")
    wait_for(lambda: len(nodes[0].sees()) == 5, 30, 0.2, "five nodes")
    data = "some shared input data\n" * 1000
    job = write_job(tmp_path / "job", """
        name = "hash200"
        inputs = ["work.py", { src = "data.txt", dest = "data.txt" }]
        outputs = ["out-*.txt"]
        [sweep]
        argv = ["python3", "work.py", "{i}"]
        count = 200
    """, {"work.py": WORK_PY, "data.txt": data})
    res = tmp_path / "results"
    code, summary, stderr = submit(nodes[0], str(job), "--results", str(res))
    assert code == 0, stderr
    assert summary["state"] == "done" and summary["tasks_done"] == 200 and summary["tasks_failed"] == 0
    assert summary["workers_used"] == 4  # every other node; the coordinator does not compute
    assert summary["results_dir"] == str(res)
    for i in range(200):
        tdir = res / f"{i:03d}"
        expected = f"{i} {hashlib.sha256(data.encode() + str(i).encode()).hexdigest()}\n"
        assert (tdir / "outputs" / f"out-{i}.txt").read_text() == expected
        assert (tdir / "stdout").read_text() == f"task {i} ok\n"
        assert json.loads((tdir / "result.json").read_text())["exit_code"] == 0
    full = json.loads((res / "summary.json").read_text())
    assert [t["index"] for t in full["tasks"]] == list(range(200))
    assert {t["attempts"] for t in full["tasks"]} == {1}
    wait_for(lambda: all_idle(nodes), 20, 0.3, "every worker back to idle")


def test_tasks_needing_a_tag_run_only_there_and_an_unservable_job_fails_clearly(grid, tmp_path):
    g = grid(4)
    h = g.testbed.hosts
    nodes = [g.start(h[0]), g.start(h[1], "--tag", "gpu=a100"), g.start(h[2]), g.start(h[3], "--tag", "gpu=a100")]
    wait_for(lambda: len(nodes[0].sees()) == 4, 30, 0.2, "four nodes")
    gpu_ids = {n["id"] for n in nodes[0].view()[0] if "gpu=a100" in n["caps"]}
    assert len(gpu_ids) == 2
    res = tmp_path / "gpu"
    code, summary, stderr = submit(nodes[0], "--tasks", "12", "--require", "gpu", "--results", str(res),
                                   "--", "echo", "{i}")
    assert code == 0, stderr
    ran_on = {t["node"] for t in json.loads((res / "summary.json").read_text())["tasks"]}
    assert ran_on <= gpu_ids and summary["tasks_done"] == 12

    t0 = time.monotonic()
    code, summary, stderr = submit(nodes[0], "--tasks", "3", "--require", "quantum", "--", "echo", "{i}")
    assert code == 1
    assert summary["state"] == "failed"
    assert "nobody can run this job" in summary["message"] and "lacks quantum" in summary["message"]
    assert time.monotonic() - t0 < 60  # a clear failure, not a hang


def test_two_jobs_from_two_nodes_at_once_share_no_node(grid, tmp_path):
    g = grid(5)
    nodes = g.start_all()
    wait_for(lambda: len(nodes[0].sees()) == 5, 30, 0.2, "five nodes")
    a = nodes[0].host.spawn([*nodes[0].cli_argv("submit", "--json", "--results", str(tmp_path / "a"),
                                                "--tasks", "40", "--", "sh", "-c", "sleep 0.05; echo a{i}")], "job-a")
    b = nodes[1].host.spawn([*nodes[1].cli_argv("submit", "--json", "--results", str(tmp_path / "b"),
                                                "--tasks", "40", "--", "sh", "-c", "sleep 0.05; echo b{i}")], "job-b")
    for p in (a, b):
        wait_for(lambda p=p: not p.alive(), 180, 0.3, "both jobs to end")
        assert p.popen.returncode == 0, p.output()[-3000:]
    for name in ("a", "b"):
        summary = json.loads((tmp_path / name / "summary.json").read_text())
        assert summary["state"] == "done" and summary["tasks_done"] == 40
        assert (tmp_path / name / "17" / "stdout").read_text() == f"{name}17\n"
    # No node was ever a member of two CEs at once: in each daemon's log, joins and leaves alternate.
    # One exception, by design: a node lent to one CE whose own job comes in coordinates it at once
    # and leaves the other CE in the same step (logged right after: "left CE ...: left for a job").
    for n in nodes:
        member_of = preempted = None
        for line in n.proc.output().splitlines():
            if m := re.search(r"now (worker|coordinator) of CE (\S+)", line):
                assert preempted is None, f"{n.host.name} did not leave {preempted} for its own job"
                if m[1] == "coordinator" and member_of not in (None, m[2]):
                    preempted = member_of
                else:
                    assert member_of in (None, m[2]), f"{n.host.name} joined {m[2]} while in {member_of}"
                member_of = m[2]
            elif m := re.search(r"left CE (\S+): left for a job submitted on this node", line):
                assert m[1] == preempted, f"{n.host.name} left {m[1]} for its job while in {member_of}"
                preempted = None
            elif "now idle" in line:
                member_of = None
        assert preempted is None, f"{n.host.name} did not leave {preempted} for its own job"


def test_one_short_job_after_another_always_finds_the_idle_desktops(grid, tmp_path):
    """Per 1-task job a desktop goes idle, worker and idle again within tens of milliseconds, and the
    mDNS goodbyes of its earlier registrations arrive after the new ones. Until 2026-11-23 the
    coordinator's view lost idle desktops that way for good: three runs in three stalled within 100
    jobs, each job then ending in "nobody can run this job: no node of this grid is visible"."""
    g = grid(3)
    nodes = g.start_all("--sample-interval", "2", "--log-level", "info")  # the defaults: fewer re-announcements
    wait_for(lambda: all_idle(nodes), 30, 0.2, "three idle nodes")
    for k in range(120):
        code, summary, err = submit(nodes[0], "--results", str(tmp_path / f"r{k}"), "--tasks", "1", "--", "true",
                                    timeout=60)
        assert code == 0 and summary.get("state") == "done", (k, summary.get("message"), err[-2000:])


def test_a_desktop_lent_to_a_ce_can_still_submit_its_own_job(grid, tmp_path):
    """Its owner's job comes first: the node leaves the CE it works for, which runs its tasks elsewhere."""
    g = grid(4)
    nodes = g.start_all("--cpus", "1")
    wait_for(lambda: len(nodes[0].sees()) == 4, 30, 0.2, "four nodes")
    a = nodes[0].host.spawn([*nodes[0].cli_argv("submit", "--json", "--results", str(tmp_path / "a"),
                                                "--tasks", "12", "--", "sh", "-c", "sleep 0.5; echo a{i}")], "job-a")
    lent = wait_for(lambda: next((n for n in nodes[1:] if nodes[0].sees().get(n.host.name) == "worker"), None),
                    60, 0.1, "a worker of the first job")
    code, summary, stderr = submit(lent, "--tasks", "3", "--results", str(tmp_path / "b"), "--", "echo", "b{i}")
    assert code == 0, stderr
    assert summary["tasks_done"] == 3 and (tmp_path / "b" / "2" / "stdout").read_text() == "b2\n"
    wait_for(lambda: not a.alive(), 120, 0.3, "the first job to end")
    assert a.popen.returncode == 0, a.output()[-3000:]
    first = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert first["state"] == "done" and first["tasks_done"] == 12 and first["tasks_failed"] == 0
    assert all((tmp_path / "a" / f"{i:02d}" / "stdout").read_text() == f"a{i}\n" for i in range(12))
    assert "left for a job submitted on this node" in lent.proc.output()


def gated(gate: Path, word: str) -> list[str]:
    """A task that waits for `gate` to exist, then prints `word` and its index: a job held running."""
    return ["sh", "-c", f"while [ ! -e {gate} ]; do sleep 0.05; done; echo {word}{{i}}"]


def jobs_of(node: GridNode) -> dict[str, dict]:
    """The jobs `bonjourgrid jobs` lists, by id."""
    r = node.cli("jobs", "--json")
    return {j["job"]: j for j in json.loads(r.stdout)} if r.returncode == 0 else {}


def detached(node: GridNode, *args: str) -> dict:
    r = node.cli("submit", "--json", "--detach", *args)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.splitlines()[-1])


def test_jobs_submitted_while_the_node_coordinates_wait_in_its_queue_and_run_in_turn(grid, tmp_path):
    """As from an HTCondor submit machine: a second and third job queue up; one can be cancelled;
    a queued job runs on its inputs as they were when it was submitted."""
    g = grid(3)
    nodes = g.start_all("--cpus", "1")
    me = nodes[0]
    wait_for(lambda: all_idle(nodes), 30, 0.2, "three idle nodes")
    gate = tmp_path / "gate"
    a = detached(me, "--tasks", "2", "--", *gated(gate, "a"))
    assert a["state"] == "submitted"
    data = tmp_path / "data.txt"
    data.write_text("as submitted\n")
    b = detached(me, "--tasks", "3", "--input", str(data), "--", "sh", "-c", "cat data.txt; echo b{i}")
    assert b["state"] == "queued" and b["tasks_total"] == 3
    data.write_text("changed after the submit\n")
    c = detached(me, "--tasks", "2", "--", "sh", "-c", f"touch {tmp_path}/c-ran-{{i}}")
    assert c["state"] == "queued"
    waiting = me.host.spawn(me.cli_argv("submit", "--json", "--results", str(tmp_path / "d"), "--tasks", "4",
                                        "--", "echo", "d{i}"), "submit-d")

    listed = wait_for(lambda: next((js for js in [jobs_of(me)] if len(js) == 4), None), 30, 0.2, "four jobs listed")
    assert list(listed)[:3] == [a["job"], b["job"], c["job"]]  # oldest first
    assert listed[a["job"]]["state"] == "running"
    assert listed[b["job"]]["state"] == "queued" and "1 job to go" in listed[b["job"]]["message"]
    assert listed[c["job"]]["state"] == "queued" and "2 jobs to go" in listed[c["job"]]["message"]
    st = json.loads(me.cli("status", b["job"], "--json").stdout)
    assert st["state"] == "queued" and st["tasks_pending"] == 3
    early = me.cli("results", b["job"], "--dest", str(tmp_path / "early"))
    assert early.returncode != 0 and "no results" in early.stderr and "queued" in early.stderr, early.stderr

    r = me.cli("cancel", c["job"])
    assert r.returncode == 0 and "cancelled" in r.stdout, r.stderr
    wait_for(lambda: "is queued: 3 jobs to go before it on this node" in waiting.output(), 30, 0.2,
             "the waiting submit to say why it waits")

    gate.touch()
    wait_for(lambda: not waiting.alive(), 120, 0.3, "the job submitted last, waiting, to end")
    assert waiting.popen.returncode == 0, waiting.output()[-3000:]
    d = last_summary(waiting)
    assert d["tasks_done"] == 4
    assert (tmp_path / "d" / "3" / "stdout").read_text() == "d3\n"
    for job, n in ((a["job"], 2), (b["job"], 3)):
        s = json.loads(me.cli("status", job, "--json").stdout)
        assert s["state"] == "done" and s["tasks_done"] == n, s
    r = me.cli("results", b["job"], "--dest", str(tmp_path / "b"))
    assert r.returncode == 0, r.stderr
    assert [(tmp_path / "b" / str(i) / "stdout").read_text() for i in range(3)] == \
        [f"as submitted\nb{i}\n" for i in range(3)]
    s = json.loads(me.cli("status", c["job"], "--json").stdout)
    assert s["state"] == "cancelled" and s["tasks_done"] == 0 and "before it started" in s["message"]
    assert not list(tmp_path.glob("c-ran-*"))
    # first submitted, first run; the cancelled one never
    started = re.findall(r"CE (\S+): coordinating job", me.proc.output())
    assert started == [a["job"], b["job"], d["job"]], started
    wait_for(lambda: all_idle(nodes), 20, 0.3, "every node back to idle")


def test_a_worker_whose_owner_comes_back_gives_its_tasks_back(grid, tmp_path):
    """Owner policy while lent: the node leaves the CE, whose job still ends with every result."""
    g = grid(3)
    h = g.testbed.hosts
    nodes = [g.start(h[0]), g.start(h[1], "--cpus", "1"),
             g.start(h[2], "--cpus", "1", "--owner-cpu", "60", "--owner-busy-after", "1", "--owner-free-after", "1")]
    wait_for(lambda: len(nodes[0].sees()) == 3, 30, 0.2, "three nodes")
    job = nodes[0].host.spawn([*nodes[0].cli_argv("submit", "--json", "--results", str(tmp_path / "r"),
                                                  "--tasks", "16", "--", "sh", "-c", "sleep 1; echo {i}")], "job")
    wait_for(lambda: nodes[0].sees().get("host3") == "worker", 60, 0.1, "host3 to work for the job")
    burners = [h[2].spawn([sys.executable, "-c", "while True: pass"], f"burner{i}") for i in range(os.cpu_count() or 1)]
    try:
        wait_for(lambda: "the owner needs this machine" in nodes[2].proc.output(), 60, 0.2, "host3 to give up")
        wait_for(lambda: "host3" not in nodes[0].sees(), 30, 0.2, "host3 to withdraw")
    finally:
        for b in burners:
            b.kill()
    wait_for(lambda: not job.alive(), 180, 0.3, "the job to end")
    assert job.popen.returncode == 0, job.output()[-3000:]
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["state"] == "done" and summary["tasks_done"] == 16 and summary["tasks_failed"] == 0
    assert all((tmp_path / "r" / f"{i:02d}" / "stdout").read_text() == f"{i}\n" for i in range(16))
    wait_for(lambda: nodes[0].sees().get("host3") == "idle", 30, 0.2, "host3 back once its owner is done")


def test_a_worker_whose_disk_falls_below_the_owners_reserve_leaves_and_comes_back(grid, tmp_path):
    """A task that fills the lent desktop's disk: the node leaves the CE at the next sample, its
    tasks run elsewhere, and it is lent again once the space has come back for a while."""
    g = grid(3)
    h = g.testbed.hosts
    with small_disk(tmp_path / "host3-default-state", "96m"):  # where Grid.start puts host3's state
        nodes = [g.start(h[0]), g.start(h[1], "--cpus", "1"),
                 g.start(h[2], "--cpus", "1", "--disk-reserve", "40M", "--owner-free-after", "1")]
        wait_for(lambda: len(nodes[0].sees()) == 3, 30, 0.2, "three nodes")
        code, summary, out = submit(nodes[0], "--tasks", "6", "--", "sh", "-c",
                                    "head -c 64000000 /dev/zero > big; sleep 1; rm big; echo {i}")
        assert code == 0, out[-3000:]
        assert (summary["state"], summary["tasks_done"], summary["tasks_failed"]) == ("done", 6, 0), summary
        assert "below the 40M kept for the owner): leaving the grid" in nodes[2].proc.output()
        wait_for(lambda: nodes[0].sees().get("host3") == "idle", 30, 0.2, "host3 lent again")


def test_failing_task_is_retried_then_reported_with_its_stderr(grid, tmp_path):
    g = grid(3)
    nodes = g.start_all()
    wait_for(lambda: len(nodes[0].sees()) == 3, 30, 0.2, "three nodes")
    job = write_job(tmp_path / "job", """
        name = "flaky"
        retries = 1
        [[task]]
        argv = ["sh", "-c", "echo fine"]
        [[task]]
        argv = ["sh", "-c", "echo boom on $(hostname) >&2; exit 3"]
    """)
    res = tmp_path / "res"
    code, summary, stderr = submit(nodes[0], str(job), "--results", str(res))
    assert code == 1, stderr
    assert summary["state"] == "failed" and summary["tasks_done"] == 1 and summary["tasks_failed"] == 1
    failed = json.loads((res / "1" / "result.json").read_text())
    assert failed["state"] == "failed" and failed["exit_code"] == 3 and failed["attempts"] == 2
    assert "boom" in (res / "1" / "stderr").read_text()
    assert (res / "0" / "stdout").read_text() == "fine\n"


def test_a_task_over_its_disk_limit_fails_saying_so_and_the_rest_of_the_job_runs(grid, tmp_path):
    """`--disk`: a task that writes more than that into its directory is stopped and fails, on each
    try, instead of filling desktops to their owners' reserve one after the other."""
    g = grid(3)
    nodes = g.start_all()
    wait_for(lambda: len(nodes[0].sees()) == 3, 30, 0.2, "three nodes")
    res = tmp_path / "res"
    script = 'if [ {i} = 1 ]; then head -c 3000000 /dev/zero > big.bin; sleep 30; fi; echo ok {i}'
    code, summary, stderr = submit(nodes[0], "--tasks", "3", "--disk", "1M", "--retries", "1", "--results", str(res),
                                   "--", "sh", "-c", script)
    assert code == 1, stderr
    assert (summary["state"], summary["tasks_done"], summary["tasks_failed"]) == ("failed", 2, 1), summary
    failed = json.loads((res / "1" / "result.json").read_text())
    assert failed["state"] == "failed" and failed["attempts"] == 2, failed
    assert "more than the job's limit of 1M: it was stopped" in failed["error"], failed
    assert (res / "2" / "stdout").read_text() == "ok 2\n"
    wait_for(lambda: all_idle(nodes), 30, 0.2, "every node idle again")


def test_tasks_failing_on_every_worker_use_all_their_retries(grid, tmp_path):
    """Two workers, four attempts each: the third and fourth run where the task failed before."""
    g = grid(3)
    nodes = g.start_all("--cpus", "1")
    wait_for(lambda: all_idle(nodes), 30, 0.2, "three idle nodes")
    job = write_job(tmp_path / "job", """
        name = "broken"
        retries = 3
        [sweep]
        argv = ["sh", "-c", "sleep 0.2; echo boom >&2; exit 3"]
        count = 4
    """)
    res = tmp_path / "res"
    code, summary, stderr = submit(nodes[0], str(job), "--results", str(res), timeout=120)
    assert code == 1, stderr
    assert summary["state"] == "failed" and summary["tasks_failed"] == 4 and summary["workers_used"] == 2
    for i in range(4):
        assert json.loads((res / str(i) / "result.json").read_text())["attempts"] == 4


def test_bad_job_files_get_clear_errors(grid, tmp_path):
    g = grid(1)
    node = g.start(g.testbed.hosts[0])
    bad = write_job(tmp_path / "bad", """
        name = "bad"
        retry = 3
        [resources]
        memory = "12X"
        [[task]]
        argv = ["true"]
    """)
    r = node.cli("submit", str(bad))
    assert r.returncode == 2
    assert "retry" in r.stderr and "retries" in r.stderr and "resources.memory" in r.stderr
    r = node.cli("submit", str(tmp_path / "missing.toml"))
    assert r.returncode == 2 and "missing.toml" in r.stderr
    syntax = tmp_path / "syntax.toml"
    syntax.write_text("name = \n")
    r = node.cli("submit", str(syntax))
    assert r.returncode == 2 and "line 1" in r.stderr
    assert node.proc.alive()


def test_forged_replayed_and_stale_recruit_requests_are_refused(grid, tmp_path):
    g = grid(2)
    target, attacker = g.start_all()
    wait_for(lambda: len(attacker.sees()) == 2, 30, 0.2, "two nodes")
    port = next(n["port"] for n in attacker.view()[0] if n["host"] == "host1")
    key = GridKey.read(g.key_file)
    body = {"ce": "evil-ce", "coordinator": "f" * 16, "lease": 30, "bus": "mqtt://10.213.0.2:1", "config": {}}
    env = Envelope("recruit", "f" * 16, body, ce="evil-ce", epoch=1)
    frames = {
        "wrong-key": seal(GridKey.generate(), "default", env, time.time()),
        "stale": seal(key, "default", env, time.time() - 3600),
    }
    good = seal(key, "default", env, time.time())
    script = tmp_path / "send.py"
    script.write_text(textwrap.dedent(f"""
        import socket, struct, sys
        for hexdata in sys.argv[1:]:
            data = bytes.fromhex(hexdata)
            s = socket.create_connection(("10.213.0.1", {port}), timeout=5)
            s.sendall(struct.pack("!I", len(data)) + data)
            s.settimeout(5)
            print(len(s.recv(65536)))
            s.close()
    """))
    # wrong key and stale: refused; the good one twice: the second is a replay, refused too.
    r = attacker.host.run(["python3", str(script), frames["wrong-key"].hex(), frames["stale"].hex(),
                           good.hex(), good.hex()], timeout=30)
    assert r.returncode == 0, r.stderr
    replies = [int(x) for x in r.stdout.split()]
    assert replies[0] == replies[1] == replies[3] == 0  # closed without an answer
    assert replies[2] > 0  # the authentic request was answered
    log = target.proc.output()
    assert "refused a control message" in log and "bad-signature" in log
    assert "stale" in log and "replayed" in log
    assert target.proc.alive()


def test_docker_runtime_runs_tasks_in_containers_without_network(grid, tmp_path, docker_image):
    g = grid(2)
    nodes = g.start_all()
    wait_for(lambda: len(nodes[0].sees()) == 2, 30, 0.2, "two nodes")
    assert "docker" in next(n["caps"] for n in nodes[0].view()[0] if n["host"] == "host2")
    job = write_job(tmp_path / "job", f"""
        name = "boxed"
        outputs = ["net.txt"]
        [runtime]
        kind = "docker"
        image = "{docker_image}"
        [sweep]
        argv = ["sh", "-c", "cat /proc/net/dev > net.txt; echo in a box {{i}}"]
        count = 2
    """)
    res = tmp_path / "res"
    code, _summary, stderr = submit(nodes[0], str(job), "--results", str(res))
    assert code == 0, stderr
    net = (res / "0" / "outputs" / "net.txt").read_text()
    interfaces = [ln.split(":")[0].strip() for ln in net.splitlines()[2:]]
    assert interfaces == ["lo"]
    assert (res / "1" / "stdout").read_text() == "in a box 1\n"


def test_cancel_stops_a_job_and_releases_its_workers(grid, tmp_path):
    g = grid(3)
    nodes = g.start_all()
    wait_for(lambda: len(nodes[0].sees()) == 3, 30, 0.2, "three nodes")
    proc = nodes[0].host.spawn(nodes[0].cli_argv("submit", "--json", "--results", str(tmp_path / "r"),
                                                  "--tasks", "50", "--", "sleep", "30"), "submit")

    def running_job():
        r = nodes[0].cli("jobs", "--json")
        jobs = json.loads(r.stdout) if r.returncode == 0 else []
        return next((j["job"] for j in jobs if j["state"] == "running" and j["tasks_running"] > 0), None)

    job = wait_for(running_job, 60, 0.3, "the job to run tasks")
    r = nodes[0].cli("cancel", job)
    assert r.returncode == 0 and "cancelled" in r.stdout, r.stderr
    wait_for(lambda: not proc.alive(), 30, 0.2, "submit to return")
    assert proc.popen.returncode == 1
    assert '"state": "cancelled"' in proc.output()
    wait_for(lambda: all_idle(nodes), 20, 0.3, "every node back to idle")
    st = nodes[0].cli("status", job, "--json")
    assert json.loads(st.stdout)["state"] == "cancelled"
    # no task process survives on the workers
    for n in nodes[1:]:
        assert [c for c in n.host.processes().values() if c.strip() == "sleep 30"] == []


ASK_JOB_PY = """
import asyncio, json, sys
from pathlib import Path
from bonjourgrid.gridkey import GridKey
from bonjourgrid.localnode import LocalNode
state_dir, key, grid, job, wait = sys.argv[1:]
node = LocalNode.find(Path(state_dir), GridKey.read(Path(key)), grid)
print(json.dumps(asyncio.run(node.ask("job", {"job": job, "wait": float(wait)}, timeout=60))))
"""


def test_a_status_request_that_waits_is_answered_when_the_job_ends(grid, tmp_path):
    """How `submit` follows a job: its reply carries the end, not the state at the time of asking."""
    g = grid(2)
    nodes = g.start_all()
    wait_for(lambda: len(nodes[0].sees()) == 2, 30, 0.2, "two nodes")
    r = nodes[0].cli("submit", "--json", "--detach", "--tasks", "2", "--", "sleep", "3")
    assert r.returncode == 0, r.stderr
    job = json.loads(r.stdout.splitlines()[-1])["job"]
    ask = [sys.executable, "-c", ASK_JOB_PY, str(nodes[0].state_dir), str(nodes[0].key_file), nodes[0].grid, job]
    now = json.loads(nodes[0].host.run([*ask, "0"], timeout=60).stdout)
    assert now["state"] == "running" and now["tasks_done"] == 0
    end = json.loads(nodes[0].host.run([*ask, "30"], timeout=60).stdout)
    assert end["state"] == "done" and end["tasks_done"] == 2


def test_submit_without_a_local_node_runs_a_temporary_one(grid, tmp_path):
    g = grid(3)
    h = g.testbed.hosts
    workers = [g.start(h[1]), g.start(h[2])]
    wait_for(lambda: len(workers[0].sees()) == 2, 30, 0.2, "two nodes")
    lonely = GridNode(h[0], None, tmp_path / "no-daemon-state", g.key_file, "default")  # type: ignore[arg-type]
    code, summary, stderr = submit(lonely, "--tasks", "6", "--results", str(tmp_path / "r"), "--", "echo", "{i}")
    assert code == 0, stderr
    assert summary["tasks_done"] == 6 and "temporary" in stderr
    assert (tmp_path / "r" / "5" / "stdout").read_text() == "5\n"


def test_a_ce_on_an_external_mosquitto_broker(grid, tmp_path):
    import shutil

    import pytest

    if not shutil.which("mosquitto"):
        pytest.skip("mosquitto is not installed (scripts/setup.sh installs it)")
    g = grid(3)
    h = g.testbed.hosts
    conf = tmp_path / "mosquitto.conf"
    conf.write_text("listener 1883 10.213.0.1\nallow_anonymous true\nset_tcp_nodelay true\n"
                    "persistence false\nuser root\n")
    broker = h[0].spawn(["mosquitto", "-c", str(conf)], "mosquitto")
    nodes = [g.start(h[0], "--broker", "mqtt://10.213.0.1:1883"), g.start(h[1]), g.start(h[2])]
    wait_for(lambda: len(nodes[0].sees()) == 3, 30, 0.2, "three nodes")
    code, summary, stderr = submit(nodes[0], "--tasks", "30", "--results", str(tmp_path / "r"), "--", "echo", "{i}")
    assert code == 0, stderr
    assert summary["tasks_done"] == 30 and summary["workers_used"] == 2
    assert "mqtt://10.213.0.1:1883" in nodes[0].proc.output()
    assert broker.alive()


def test_each_ce_broker_a_node_can_start(grid, tmp_path):
    """`--ce-broker`: the built-in amqtt (what a desktop without Mosquitto gets) and Mosquitto both carry a CE."""
    import shutil

    import pytest

    if not shutil.which("mosquitto"):
        pytest.skip("mosquitto is not installed (scripts/setup.sh installs it)")
    g = grid(4)
    h = g.testbed.hosts
    coords = {"amqtt": g.start(h[0], "--ce-broker", "amqtt"), "mosquitto": g.start(h[1], "--ce-broker", "mosquitto")}
    workers = [g.start(h[2], "--cpus", "1"), g.start(h[3], "--cpus", "1")]
    wait_for(lambda: len(workers[0].sees()) == 4, 30, 0.2, "four nodes")
    for kind, says in (("amqtt", "embedded MQTT broker pid"), ("mosquitto", "CE broker: mosquitto pid")):
        code, summary, stderr = submit(coords[kind], "--tasks", "30", "--results", str(tmp_path / kind), "--",
                                       "echo", "{i}")
        assert code == 0, stderr
        assert summary["tasks_done"] == 30 and summary["workers_used"] >= 2  # the other coordinator may help
        assert (tmp_path / kind / "29" / "stdout").read_text() == "29\n"
        assert says in coords[kind].proc.output()
    wait_for(lambda: set(workers[0].sees().values()) == {"idle"}, 30, 0.2, "every node idle")


def test_a_lent_desktop_removes_old_copies_of_other_jobs_but_never_its_owners(grid, tmp_path):
    """The replica's journal copy and the workers' leftovers go once untouched for --keep-copies; the job stays."""
    g = grid(3)
    nodes = g.start_all()
    submitter, workers = nodes[0], nodes[1:]
    wait_for(lambda: all_idle(nodes), 30, 0.2, "three idle nodes")
    code, summary, stderr = submit(submitter, "--tasks", "4", "--results", str(tmp_path / "r"), "--", "sleep", "1")
    assert code == 0 and summary["tasks_done"] == 4, stderr
    job = summary["job"]
    copies = [n for n in workers if (n.state_dir / "ces" / job / "journal.db").is_file()]
    assert copies, "no worker held a replica of the journal"
    leftover = workers[0].state_dir / "work" / "killed-ce"  # what a worker killed in a CE leaves
    leftover.mkdir(parents=True)
    for n in nodes:
        n.proc.stop()
    hour_ago = time.time() - 3600  # everything, the submitter's job too, untouched for an hour
    for d in [leftover, *(n.state_dir / "ces" / job for n in [submitter, *copies])]:
        for p in [*d.iterdir(), d]:
            os.utime(p, (hour_ago, hour_ago))
    nodes = [g.start(n.host, "--keep-copies", "0.02") for n in nodes]  # about half an hour
    wait_for(lambda: not any((n.state_dir / "ces" / job).exists() for n in copies) and not leftover.exists(),
             20, 0.2, "old copies removed")
    assert any("removed" in line and job in line for n in nodes for line in n.proc.output().splitlines())
    assert (submitter.state_dir / "ces" / job / "journal.db").is_file()  # submitted here: the owner's
    r = nodes[0].cli("results", job, "--dest", str(tmp_path / "again"))
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "again" / "summary.json").read_text())["tasks_done"] == 4


def test_results_stream_into_the_results_directory_while_the_job_runs(grid, tmp_path):
    g = grid(3)
    nodes = g.start_all()
    wait_for(lambda: all_idle(nodes), 30, 0.2, "three idle nodes")
    res = tmp_path / "r"
    # task 7 runs long: the others' results must be on disk before the job ends
    argv = nodes[0].cli_argv("submit", "--json", "--results", str(res), "--tasks", "8", "--",
                             "sh", "-c", 'if [ {i} = 7 ]; then sleep 6; fi; echo out-{i}')
    submit = nodes[0].host.spawn(argv, "submit")
    try:
        wait_for(lambda: all((res / str(i) / "stdout").is_file() for i in range(7)), 30, 0.1, "early results")
        assert submit.alive() and not (res / "summary.json").exists()  # the job is still running
        assert not (res / "7").exists()
        wait_for(lambda: not submit.alive(), 60, 0.2, "the end of the job")
    finally:
        submit.stop()
    summary = json.loads((res / "summary.json").read_text())
    assert summary["state"] == "done" and summary["tasks_done"] == 8
    assert [t["index"] for t in summary["tasks"]] == list(range(8))
    for i in range(8):
        assert (res / str(i) / "stdout").read_text() == f"out-{i}\n"
        assert json.loads((res / str(i) / "result.json").read_text())["exit_code"] == 0


def test_a_coordinator_whose_disk_fills_up_says_so_waits_and_loses_no_result(grid, tmp_path):
    """The coordinator's state dir on a 3 MiB tmpfs; 60 results of 100 kB each cannot fit in its journal."""
    g = grid(3)
    with small_disk(tmp_path / "host1-default-state", "3m") as state:  # where Grid.start puts host1's state
        nodes = [g.start(h, *(("--cpus", "1") if h.index > 1 else ())) for h in g.testbed.hosts]
        wait_for(lambda: all_idle(nodes), 30, 0.2, "three idle nodes")
        res = tmp_path / "res"
        argv = nodes[0].cli_argv("submit", "--json", "--results", str(res), "--tasks", "60", "--",
                                 "python3", "-c", "print('{i}' * 100000)")
        submit_proc = nodes[0].host.spawn(argv, "submit")
        wait_for(lambda: a_job_says(nodes[0], "full"), 60, 0.2, "the status saying the journal cannot be written")
        assert submit_proc.alive()
        grow(state)
        wait_for(lambda: not submit_proc.alive(), 120, 0.2, "the end of the job")
        summary = last_summary(submit_proc)
        assert summary["state"] == "done" and summary["tasks_done"] == 60, submit_proc.output()[-3000:]
        for i in range(60):
            assert (res / f"{i:02d}" / "stdout").read_text() == f"{i}" * 100000 + "\n"
        assert "cannot write the journal" in nodes[0].proc.output()
        wait_for(lambda: all_idle(nodes), 30, 0.2, "every node idle again")


def test_outputs_a_full_coordinator_cannot_store_wait_on_their_workers_and_arrive(grid, tmp_path):
    """Files too big to travel inline are uploaded; with no room for them, the tasks did nothing wrong."""
    g = grid(3)
    with small_disk(tmp_path / "host1-default-state", "4m") as state:  # where Grid.start puts host1's state
        nodes = g.start_all("--cpus", "1")
        wait_for(lambda: all_idle(nodes), 30, 0.2, "three idle nodes")
        job = write_job(tmp_path / "job", """
            name = "big-outputs"
            outputs = ["out.bin"]
            [sweep]
            argv = ["python3", "-c", "open('out.bin', 'wb').write(bytes([{i}]) * 1500000)"]
            count = 6
        """)
        res = tmp_path / "res"
        submit_proc = nodes[0].host.spawn(nodes[0].cli_argv("submit", "--json", "--results", str(res), str(job)),
                                          "submit")
        wait_for(lambda: a_job_says(nodes[0], "cannot store uploaded outputs"), 60, 0.2,
                 "the status saying the outputs cannot be stored")
        grow(state)
        wait_for(lambda: not submit_proc.alive(), 120, 0.2, "the end of the job")
        summary = last_summary(submit_proc)
        assert summary["state"] == "done" and summary["tasks_done"] == 6, submit_proc.output()[-3000:]
        for i in range(6):
            assert (res / str(i) / "outputs" / "out.bin").read_bytes() == bytes([i]) * 1500000
            assert json.loads((res / str(i) / "result.json").read_text())["attempts"] == 1


def test_a_submit_on_a_full_disk_is_refused_clearly_and_leaves_the_node_idle(grid, tmp_path):
    g = grid(2)
    with small_disk(tmp_path / "host1-default-state", "2m") as state:  # where Grid.start puts host1's state
        nodes = g.start_all("--cpus", "1")
        wait_for(lambda: all_idle(nodes), 30, 0.2, "two idle nodes")
        filler = state / "filler"
        with open(filler, "wb") as f, contextlib.suppress(OSError):  # until the disk is full
            while True:
                f.write(b"\0" * 65536)
        code, _, stderr = submit(nodes[0], "--tasks", "3", "--", "echo", "{i}", timeout=60)
        flat = " ".join(stderr.split())
        assert code == 1 and "could not start the computing element: cannot open the journal" in flat, stderr
        assert "full" in flat
        wait_for(lambda: all_idle(nodes), 30, 0.2, "the node idle again")
        filler.unlink()
        code, summary, stderr = submit(nodes[0], "--results", str(tmp_path / "res"), "--tasks", "3", "--",
                                       "echo", "{i}", timeout=60)
        assert code == 0 and summary["tasks_done"] == 3, stderr


def test_a_full_results_directory_is_a_clear_error_and_the_results_can_be_written_elsewhere(grid, tmp_path):
    g = grid(3)
    with small_disk(tmp_path / "res", "1m") as res:
        nodes = g.start_all("--cpus", "1")
        wait_for(lambda: all_idle(nodes), 30, 0.2, "three idle nodes")
        code, summary, stderr = submit(nodes[0], "--results", str(res), "--tasks", "30", "--",
                                       "python3", "-c", "print('{i}' * 100000)", timeout=120)
    assert code == 1 and summary["state"] == "done" and summary["tasks_done"] == 30, (code, summary, stderr)
    flat = " ".join(stderr.split())
    assert f"cannot write the results into {res}" in flat and "No space left on device" in flat, stderr
    assert "Traceback" not in stderr
    job = summary["job"]
    assert f"bonjourgrid results {job} --dest DIR" in flat
    other = tmp_path / "other"
    r = nodes[0].cli("results", job, "--dest", str(other))
    assert r.returncode == 0, r.stderr
    for i in range(30):
        assert (other / f"{i:02d}" / "stdout").read_text() == f"{i}" * 100000 + "\n"


def test_a_job_that_nearly_fills_a_message_reaches_its_replica_and_a_bigger_one_is_refused(grid, tmp_path):
    """A job travels whole to its coordinator and, as the journal's first change, to its replicas."""
    g = grid(3)
    nodes = g.start_all()
    wait_for(lambda: all_idle(nodes), 30, 0.2, "three idle nodes")
    pad = "x" * 1800  # 4,000 tasks of this: 7.1 MiB sent, near the 7.5 MiB a job can hold
    code, summary, stderr = submit(nodes[0], "--tasks", "4000", "--results", str(tmp_path / "r"), "--",
                                   "true", pad + "{i}")
    assert code == 0 and summary["tasks_done"] == 4000, stderr
    job = summary["job"]
    copies = [n.state_dir / "ces" / job / "journal.db" for n in nodes[1:]]
    copies = [c for c in copies if c.is_file()]
    assert copies, "no worker held a replica of the journal"
    for copy in copies:  # the first batch had to be the job's change alone, to fit in one message
        db = sqlite3.connect(copy)
        try:
            assert db.execute("SELECT count(*) FROM tasks WHERE state='done'").fetchone() == (4000,)
        finally:
            db.close()
    r = nodes[0].cli("submit", "--json", "--tasks", "5000", "--", "true", pad + "{i}")
    assert r.returncode == 2
    assert "5000 tasks make" in r.stderr and "split the sweep into several jobs" in r.stderr
