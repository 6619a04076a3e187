"""Process runtime and sandbox confinement, with real processes (no docker needed)."""

from __future__ import annotations

import asyncio
import collections
import hashlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from bonjourgrid.execution import (
    Executor,
    Limits,
    OutputFile,
    TaskOutcome,
    TaskRun,
    collect_outputs,
    disk_usage,
    safe_join,
)
from bonjourgrid.spawner import HOLD_REPLIES, HOLD_S, Spawner

pytestmark = pytest.mark.timeout(60)

PY = sys.executable


def _run(sandbox: Path, argv: list[str], executor: Executor | None = None, **kw) -> TaskOutcome:
    limits = kw.pop("limits", Limits())
    run = TaskRun(
        task_id=kw.pop("task_id", "t1"),
        argv=tuple(argv),
        env=kw.pop("env", {}),
        sandbox=sandbox,
        output_globs=tuple(kw.pop("globs", ())),
        limits=limits,
        **kw,
    )
    ex = executor or Executor(kill_grace_s=0.5)

    async def go() -> TaskOutcome:
        try:
            return await ex.run(run)
        finally:
            if executor is None:
                ex.close()  # in the loop that owns the spawner's pipes

    return asyncio.run(go())


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _wait_gone(pids: list[int], within: float = 5.0) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if all(_gone(p) for p in pids):
            return True
        time.sleep(0.05)
    return False


def _read_pids(path: Path, n: int, within: float = 10.0) -> list[int]:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if path.exists():
            pids = [int(x) for x in path.read_text().split()]
            if len(pids) >= n:
                return pids
        time.sleep(0.05)
    raise AssertionError(f"{path} never got {n} pids")


# --------------------------------------------------------------------------- basics


def test_exit_codes_and_ok(tmp_path: Path) -> None:
    ok = _run(tmp_path, ["true"])
    assert ok.exit_code == 0 and ok.ok and ok.error is None
    assert ok.started_at <= ok.ended_at
    bad = _run(tmp_path, ["sh", "-c", "exit 3"])
    assert bad.exit_code == 3 and not bad.ok


def test_exit_by_signal_is_negative(tmp_path: Path) -> None:
    out = _run(tmp_path, ["sh", "-c", "kill -9 $$"])
    assert out.exit_code == -9 and not out.timed_out


def test_stdout_and_stderr_separate(tmp_path: Path) -> None:
    out = _run(tmp_path, ["sh", "-c", "echo to-out; echo to-err >&2"])
    assert out.stdout == b"to-out\n" and out.stderr == b"to-err\n"
    assert not out.stdout_truncated and not out.stderr_truncated


def test_big_output_keeps_head_and_marks_truncated(tmp_path: Path) -> None:
    cap = 1 << 20
    out = _run(tmp_path, ["sh", "-c", "yes | head -c 5000000; echo small >&2"], limits=Limits(max_output_bytes=cap))
    assert out.exit_code == 0
    assert len(out.stdout) == cap and out.stdout_truncated and out.stdout.startswith(b"y\ny\n")
    assert out.stderr == b"small\n" and not out.stderr_truncated


def test_missing_program_is_an_error_not_an_exception(tmp_path: Path) -> None:
    out = _run(tmp_path, ["no-such-program-bonjourgrid"])
    assert out.exit_code is None and not out.ok
    assert out.error is not None and "no such program" in out.error


def test_a_program_moved_on_path_between_two_tasks_is_found_again_and_one_removed_fails_clearly(tmp_path: Path) -> None:
    """The worker remembers where a program was for a few seconds; the spawner looks on PATH again
    if it has gone from there since, as a shell does when its hash table is stale."""
    first, second, box = tmp_path / "first", tmp_path / "second", tmp_path / "box"
    for d in (first, second, box):
        d.mkdir()
    name = f"bg-moved-{os.getpid()}"
    for d in (first, second):
        (d / name).write_text(f"#!/bin/sh\necho {d.name}\n")
        (d / name).chmod(0o755)
    env = {"PATH": f"{first}:{second}:/usr/bin:/bin"}
    ex = Executor(kill_grace_s=0.5)

    async def go() -> list[TaskOutcome]:
        try:
            outcomes = [await ex.run(TaskRun(task_id="t1", argv=(name,), env=env, sandbox=box, output_globs=()))]
            (first / name).unlink()
            outcomes.append(await ex.run(TaskRun(task_id="t2", argv=(name,), env=env, sandbox=box, output_globs=())))
            (second / name).unlink()
            outcomes.append(await ex.run(TaskRun(task_id="t3", argv=(name,), env=env, sandbox=box, output_globs=())))
            return outcomes
        finally:
            ex.close()

    found, moved, removed = asyncio.run(go())
    assert found.stdout == b"first\n" and moved.stdout == b"second\n"
    assert removed.exit_code is None and removed.error is not None and "no such program" in removed.error


def test_bad_requests_are_errors(tmp_path: Path) -> None:
    assert "argv" in (_run(tmp_path, []).error or "")
    assert "runtime" in (_run(tmp_path, ["true"], runtime="vm").error or "")
    assert "image" in (_run(tmp_path, ["true"], runtime="docker").error or "")
    assert "not a directory" in (_run(tmp_path / "missing", ["true"]).error or "")


def test_env_is_minimal_plus_task_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BONJOURGRID_SECRET_OF_WORKER", "do-not-leak")
    out = _run(tmp_path, [PY, "-c", "import os, json; print(json.dumps(dict(os.environ)))"], env={"FOO": "bar"})
    env = json.loads(out.stdout)
    assert env["FOO"] == "bar"
    assert env["HOME"] == str(tmp_path.resolve())
    assert env["TMPDIR"] == str(tmp_path.resolve() / "tmp") and (tmp_path / "tmp").is_dir()
    assert "BONJOURGRID_SECRET_OF_WORKER" not in env
    assert "PATH" in env and "LANG" in env


def test_tasks_run_at_the_executors_niceness(tmp_path: Path) -> None:
    """A desktop's owner gets the CPU first: the grid's tasks and what they start run niced."""
    child = "['sh', '-c', 'cut -d\" \" -f19 /proc/$$/stat']"  # a process the task starts: field 19 is its nice
    script = f"import os, subprocess; print(os.getpriority(os.PRIO_PROCESS, 0))\n" \
             f"print(subprocess.run({child}, capture_output=True, text=True).stdout)"
    out = _run(tmp_path, [PY, "-c", script], executor=None)
    assert out.stdout.split() == [b"0", b"0"]
    niced = _run(tmp_path, [PY, "-c", script], Executor(kill_grace_s=0.5, task_nice=7))
    assert niced.stdout.split() == [b"7", b"7"], niced


def test_cwd_is_the_sandbox(tmp_path: Path) -> None:
    (tmp_path / "input.txt").write_text("staged\n")
    out = _run(tmp_path, ["cat", "input.txt"])
    assert out.stdout == b"staged\n"


def _ignored(sigign_hex: str) -> set[int]:
    """The signals a /proc/<pid>/status SigIgn mask names, but glibc's two internal ones (32 and 33:
    its posix_spawn leaves them ignored, as for every program Rust's std or CPython start that way;
    no program may use them, and glibc and musl take them back when they need them)."""
    mask = int(sigign_hex, 16)
    return {n for n in range(1, 65) if mask >> (n - 1) & 1} - {32, 33}


def test_a_task_starts_with_default_signals_null_stdin_and_no_stray_descriptors(tmp_path: Path) -> None:
    """What a program expects of a fresh start: Python ignores SIGPIPE and SIGXFSZ for itself, and
    a task that inherited that would die noisily in a pipeline (`yes | head` -> "Broken pipe")."""
    out = _run(tmp_path, ["sh", "-c", "grep SigIgn /proc/self/status; readlink /proc/self/fd/0; ls /proc/self/fd"])
    lines = out.stdout.decode().split()
    assert lines[0] == "SigIgn:" and _ignored(lines[1]) == set()
    assert lines[2] == "/dev/null"
    assert sorted(lines[3:]) == ["0", "1", "2", "3"]  # 3: the directory `ls` reads
    piped = _run(tmp_path, ["sh", "-c", "yes | head -n 1"])
    assert piped.ok and piped.stdout == b"y\n" and piped.stderr == b""


def test_a_task_starts_with_default_signals_even_when_the_node_ignores_some(tmp_path: Path) -> None:
    """A node started in the background of a script ignores SIGINT and SIGQUIT, one under nohup
    SIGHUP; its tasks must not inherit that (found when CI ran the suite as a background job)."""
    ignored = (signal.SIGINT, signal.SIGQUIT, signal.SIGHUP)
    before = {s: signal.signal(s, signal.SIG_IGN) for s in ignored}
    try:
        out = _run(tmp_path, ["grep", "SigIgn", "/proc/self/status"])
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)
    label, mask = out.stdout.decode().split()
    assert label == "SigIgn:" and _ignored(mask) == set()


def test_a_relative_program_is_found_in_the_sandbox(tmp_path: Path) -> None:
    (tmp_path / "script.sh").write_text("#!/bin/sh\necho \"$0 in $PWD\"\n")
    (tmp_path / "script.sh").chmod(0o755)
    out = _run(tmp_path, ["./script.sh"])
    assert out.ok and out.stdout.decode() == f"./script.sh in {tmp_path}\n"


def test_tasks_run_in_their_sandbox_given_relative_to_the_nodes_directory(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A node started with a relative --state-dir: every task, not only the first, runs in its sandbox."""
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
    monkeypatch.chdir(tmp_path)
    ex = Executor(kill_grace_s=0.5)

    async def go() -> list[TaskOutcome]:
        try:
            return [await ex.run(TaskRun(task_id=name, argv=("pwd",), env={}, sandbox=Path(name), output_globs=()))
                    for name in ("a", "b", "a")]
        finally:
            ex.close()

    assert [o.stdout.decode() for o in asyncio.run(go())] == [f"{tmp_path / n}\n" for n in ("a", "b", "a")]


def test_outcome_dict_round_trip(tmp_path: Path) -> None:
    (tmp_path / "r.bin").write_bytes(b"\x00\xff")
    out = _run(tmp_path, [PY, "-c", "import sys; sys.stdout.buffer.write(bytes(range(256)))"], globs=["*.bin"])
    d = json.loads(json.dumps(out.to_dict()))
    assert TaskOutcome.from_dict(d) == out
    assert out.outputs[0].path == "r.bin"


# --------------------------------------------------------------------------- limits, timeouts, cancel


def test_a_task_that_fills_more_disk_than_its_limit_is_stopped_and_fails_saying_so(tmp_path: Path) -> None:
    """BOINC's disk bound: without it such a task fills the desktop's disk to the owner's reserve,
    and the node leaves the grid; the task then reruns elsewhere and fills that disk too."""
    script = "head -c 3000000 /dev/zero > big.bin; echo wrote; sleep 30"
    out = _run(tmp_path, ["sh", "-c", script], limits=Limits(disk_bytes=1 << 20))
    assert not out.ok and out.exit_code is None and not out.cancelled
    assert out.error is not None and "more than the job's limit of 1M: it was stopped" in out.error, out.error
    assert re.search(r"used 2\.\dM of disk", out.error), out.error
    assert out.stdout == b"wrote\n"  # what it printed is kept, to see what it was doing
    within = tmp_path / "within"
    within.mkdir()
    ok = _run(within, ["sh", "-c", "head -c 100000 /dev/zero > small.bin; sleep 1.5"],
              limits=Limits(disk_bytes=1 << 20))
    assert ok.ok, ok  # measured at least once while it ran, and under the limit


def test_disk_usage_counts_what_the_disk_holds_once(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a").write_bytes(b"x" * 100_000)
    os.link(tmp_path / "d" / "a", tmp_path / "hard")
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "b").write_bytes(b"x" * 500_000)
    box = tmp_path / "d"
    os.symlink(tmp_path / "outside", box / "link")
    os.link(tmp_path / "hard", box / "again")
    used = disk_usage(box)
    assert 100_000 <= used < 200_000  # one copy of `a`, not of its second name, nor what the link points to
    assert disk_usage(tmp_path / "gone") == 0



_TREE = """
import os, sys, time
pid = os.fork()
if pid == 0:
    g = os.fork()
    if g == 0:
        time.sleep(300)
        os._exit(0)
    with open("pids", "a") as f:
        f.write(f"{os.getpid()} {g}\\n")
    time.sleep(300)
    os._exit(0)
time.sleep(300)
"""


def test_timeout_kills_the_whole_group(tmp_path: Path) -> None:
    t0 = time.monotonic()
    out = _run(tmp_path, [PY, "-c", _TREE], limits=Limits(timeout_s=1.0))
    took = time.monotonic() - t0
    assert out.timed_out and out.exit_code is None and not out.ok and out.error is None
    assert took < 10
    pids = _read_pids(tmp_path / "pids", 2)
    assert _wait_gone(pids), f"survivors: {[p for p in pids if not _gone(p)]}"


def test_term_ignoring_task_is_killed_after_grace(tmp_path: Path) -> None:
    script = "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\nprint('up', flush=True)\n"
    script += "time.sleep(60)"
    t0 = time.monotonic()
    out = _run(tmp_path, [PY, "-c", script], limits=Limits(timeout_s=1.0))
    assert out.timed_out and out.stdout == b"up\n"
    assert time.monotonic() - t0 < 6


def test_background_leftovers_are_killed_when_main_exits(tmp_path: Path) -> None:
    # The sleeper inherits stdout: without the group kill, reading to EOF would wait 300 s.
    t0 = time.monotonic()
    out = _run(tmp_path, ["sh", "-c", "sleep 300 & echo $! > pids; echo done"])
    assert out.exit_code == 0 and out.stdout == b"done\n"
    assert time.monotonic() - t0 < 5
    assert _wait_gone(_read_pids(tmp_path / "pids", 1))


# A daemon's double fork: the grandchild leaves the task's session and group, and its parent exits.
_ESCAPE = "import os, time\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n" \
          "        os.close(1); os.close(2)\n        open('pids', 'a').write(f'{os.getpid()} ')\n" \
          "        time.sleep(300)\n    os._exit(0)\nos.wait()\n"


def test_a_process_that_escaped_its_task_ends_soon_after_the_task(tmp_path: Path) -> None:
    """setsid leaves the group the spawner kills; as the tasks' subreaper, the spawner still ends it.
    The executor stays open: this is the task's end, not the worker leaving."""
    async def scenario() -> TaskOutcome:
        ex = Executor(kill_grace_s=0.5)
        try:
            out = await ex.run(TaskRun("esc", (PY, "-c", _ESCAPE), {}, tmp_path, (), Limits()))
            pid = (await asyncio.to_thread(_read_pids, tmp_path / "pids", 1))[0]
            assert await asyncio.to_thread(_wait_gone, [pid])
            return out
        finally:
            ex.close()

    assert asyncio.run(scenario()).exit_code == 0


def test_what_escaped_a_running_task_lives_as_long_as_the_task(tmp_path: Path) -> None:
    """A task may start a helper with setsid and use it: it is killed with the task, not before.
    The task itself looks at its helper after 1.2 s of its life, two of the spawner's sweeps."""
    script = _ESCAPE.replace("os.wait()\n", "os.wait()\n"
                             "while not (os.path.exists('pids') and open('pids').read().strip()): time.sleep(0.01)\n"
                             "time.sleep(1.2); os.kill(int(open('pids').read()), 0); print('helper alive')\n")

    async def scenario() -> TaskOutcome:
        ex = Executor(kill_grace_s=0.5)
        try:
            out = await ex.run(TaskRun("helper", (PY, "-c", script), {}, tmp_path, (), Limits()))
            assert await asyncio.to_thread(_wait_gone, _read_pids(tmp_path / "pids", 1))
            return out
        finally:
            ex.close()

    out = asyncio.run(scenario())
    assert out.exit_code == 0 and out.stdout == b"helper alive\n", out


def test_what_escaped_ends_when_the_worker_leaves(tmp_path: Path) -> None:
    script = _ESCAPE.replace("os.wait()\n", "os.wait()\nimport time; time.sleep(60)\n")

    async def scenario() -> None:
        ex = Executor(kill_grace_s=0.5)
        task = asyncio.create_task(ex.run(TaskRun("long", (PY, "-c", script), {}, tmp_path, (), Limits())))
        await asyncio.to_thread(_read_pids, tmp_path / "pids", 1)
        ex.close()
        await asyncio.wait_for(task, 10)

    asyncio.run(scenario())
    assert _wait_gone(_read_pids(tmp_path / "pids", 1))


def test_executor_cancel_returns_cancelled_outcome(tmp_path: Path) -> None:
    async def scenario() -> TaskOutcome:
        ex = Executor(kill_grace_s=0.5)
        run = TaskRun("job-7", (PY, "-c", _TREE), {}, tmp_path, (), Limits())
        task = asyncio.create_task(ex.run(run))
        await asyncio.to_thread(_read_pids, tmp_path / "pids", 2)
        assert ex.cancel("job-7")
        try:
            return await task
        finally:
            ex.close()

    out = asyncio.run(scenario())
    assert out.cancelled and not out.timed_out and out.exit_code is None and not out.ok
    assert _wait_gone(_read_pids(tmp_path / "pids", 2))
    assert not Executor().cancel("unknown")


def test_a_cancel_that_comes_before_the_task_started_still_stops_it(tmp_path: Path) -> None:
    async def scenario() -> tuple[TaskOutcome, float]:
        ex = Executor(kill_grace_s=0.5)
        task = asyncio.create_task(ex.run(TaskRun("job-9", ("sleep", "30"), {}, tmp_path, (), Limits())))
        await asyncio.sleep(0)  # run() is in, waiting for the (new) spawner: nothing started yet
        t0 = time.monotonic()
        assert ex.cancel("job-9")
        try:
            return await task, time.monotonic() - t0
        finally:
            ex.close()

    out, took = asyncio.run(scenario())
    assert out.cancelled and out.exit_code is None and not out.ok
    assert took < 10


def _queued(tmp_path: Path, argvs: list[list[str]], slots: int, cancel: str | None = None,
            once: Path | None = None) -> list[TaskOutcome]:
    """Run the attempts at once through one spawner queue of `slots`; optionally cancel one once `once` exists."""
    async def scenario() -> list[TaskOutcome]:
        ex = Executor(kill_grace_s=0.5)
        runs = []
        for i, argv in enumerate(argvs):
            (tmp_path / str(i)).mkdir(parents=True)
            runs.append(TaskRun(f"t{i}", tuple(argv), {}, tmp_path / str(i), (), Limits(), queue=("ce", slots)))
        tasks = [asyncio.create_task(ex.run(r)) for r in runs]
        if cancel is not None:
            deadline = time.monotonic() + 10
            while once is not None and not once.exists() and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            assert ex.cancel(cancel)
        try:
            return list(await asyncio.gather(*tasks))
        finally:
            ex.close()

    return asyncio.run(scenario())


def test_a_queue_runs_no_more_attempts_at_once_than_its_slots(tmp_path: Path) -> None:
    for slots in (1, 2):
        outs = _queued(tmp_path / str(slots), [["sleep", "0.2"]] * 5, slots)
        assert all(o.ok for o in outs)
        spans = sorted((o.started_at, o.ended_at) for o in outs)
        most = max(sum(1 for a, b in spans if a <= t < b) for t, _ in spans)
        assert most == slots, spans


def test_a_deep_queue_of_short_attempts_gives_each_its_own_outcome(tmp_path: Path) -> None:
    """Ends reported together (the spawner holds replies while attempts wait) still reach the right attempt."""
    outs = _queued(tmp_path, [["sh", "-c", f"echo {i}; echo e{i} >&2; exit {i % 3}"] for i in range(40)], 2)
    assert [(o.stdout, o.stderr, o.exit_code) for o in outs] == [
        (f"{i}\n".encode(), f"e{i}\n".encode(), i % 3) for i in range(40)]


def test_replies_wait_while_attempts_wait_for_a_slot_and_never_longer_than_the_hold() -> None:
    out = io.BytesIO()
    sp = Spawner(out)
    sp.waiting["ce"] = collections.deque([object()])  # an attempt waits for a slot
    for i in range(3):
        sp.send({"id": i})
        sp.flush()
    assert out.getvalue() == b""  # kept back: its worker has nothing to start
    assert 0 < sp.next_wakeup() <= HOLD_S  # ... not beyond the hold
    sp.hold_until = time.monotonic() - 1
    sp.flush()
    assert [json.loads(x)["id"] for x in out.getvalue().splitlines()] == [0, 1, 2]  # in one write
    out.seek(0), out.truncate()
    for i in range(HOLD_REPLIES):
        sp.send({"id": i})
        sp.flush()
    assert len(out.getvalue().splitlines()) == HOLD_REPLIES  # enough for one write: sent
    out.seek(0), out.truncate()
    sp.waiting.clear()  # nothing waits: a reply goes at once
    sp.send({"id": 9})
    sp.flush()
    assert out.getvalue() == b'{"id": 9}\n'


def test_an_attempt_cancelled_while_queued_never_runs(tmp_path: Path) -> None:
    first = ["sh", "-c", "touch ../running; sleep 1"]  # holds the only slot while t1 waits behind it
    outs = _queued(tmp_path, [first, ["sh", "-c", "echo ran > marker"], ["true"]], 1, cancel="t1",
                   once=tmp_path / "running")
    assert outs[0].ok and outs[2].ok
    assert outs[1].cancelled and outs[1].exit_code is None and not (tmp_path / "1" / "marker").exists()
    assert outs[2].started_at >= outs[0].ended_at  # the cancelled one did not hold the slot


def test_asyncio_cancel_kills_and_raises(tmp_path: Path) -> None:
    async def scenario() -> None:
        ex = Executor(kill_grace_s=0.5)
        run = TaskRun("job-8", (PY, "-c", _TREE), {}, tmp_path, (), Limits())
        task = asyncio.create_task(ex.run(run))
        await asyncio.to_thread(_read_pids, tmp_path / "pids", 2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        ex.close()

    asyncio.run(scenario())
    assert _wait_gone(_read_pids(tmp_path / "pids", 2))


def test_memory_limit_makes_greedy_allocation_fail(tmp_path: Path) -> None:
    greedy = "x = bytearray(600 << 20); print('allocated')"
    out = _run(tmp_path, [PY, "-c", greedy], limits=Limits(memory_bytes=300 << 20))
    assert out.exit_code not in (0, None)
    assert b"MemoryError" in out.stderr and b"allocated" not in out.stdout
    # and the same allocation passes without the tight limit, so it is the limit that bit
    roomy = _run(tmp_path, [PY, "-c", greedy], limits=Limits(memory_bytes=2 << 30))
    assert roomy.ok and roomy.stdout == b"allocated\n"


def test_file_size_limit(tmp_path: Path) -> None:
    out = _run(tmp_path, ["sh", "-c", "head -c 100000 /dev/zero > big"], limits=Limits(max_file_bytes=10_000))
    assert not out.ok
    assert (tmp_path / "big").stat().st_size <= 10_000


def test_core_dumps_disabled(tmp_path: Path) -> None:
    out = _run(tmp_path, ["sh", "-c", "ulimit -c; ulimit -n"])
    assert out.stdout.split() == [b"0", b"1024"]


# --------------------------------------------------------------------------- outputs and confinement


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_outputs_collected_by_glob_with_sha256(tmp_path: Path) -> None:
    script = "mkdir -p sub/deep; printf a > a.txt; printf bb > sub/b.txt; printf ccc > sub/deep/c.txt; printf x > n.dat"
    out = _run(tmp_path, ["sh", "-c", script], globs=["*.txt", "sub/**/*.txt", "missing.bin"])
    assert out.ok
    assert out.outputs == (
        OutputFile("a.txt", 1, _sha(b"a")),
        OutputFile("sub/b.txt", 2, _sha(b"bb")),
        OutputFile("sub/deep/c.txt", 3, _sha(b"ccc")),
    )


def test_star_does_not_cross_directories_and_dirs_are_skipped(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "f").write_text("1")
    (tmp_path / "top").write_text("2")
    assert [o.path for o in collect_outputs(tmp_path, ("*",))] == ["top"]
    assert [o.path for o in collect_outputs(tmp_path, ("d",))] == []
    assert [o.path for o in collect_outputs(tmp_path, ("**",))] == ["d/f", "top"]
    assert [o.path for o in collect_outputs(tmp_path, ("./top",))] == ["top"]


def test_bad_globs_refused(tmp_path: Path) -> None:
    for bad in ("../x", "/etc/passwd", "a/../../b", "", "."):
        with pytest.raises(ValueError):
            collect_outputs(tmp_path, (bad,))
    out = _run(tmp_path, ["true"], globs=["../*"])
    assert out.error is not None and ".." in out.error and out.exit_code is None


def test_symlink_escapes_skipped(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    sandbox = tmp_path / "sb"
    sandbox.mkdir()
    outside = tmp_path / "secret.txt"
    outside.write_text("secret")
    (tmp_path / "outdir").mkdir()
    (tmp_path / "outdir" / "x.txt").write_text("secret too")
    script = (
        f"ln -s {outside} leak.txt; ln -s {tmp_path / 'outdir'} linkdir; "
        "printf ok > real.txt; ln -s real.txt alias.txt; ln -s nowhere broken.txt; mkfifo pipe.txt"
    )
    with caplog.at_level("WARNING"):
        out = _run(sandbox, ["sh", "-c", script], globs=["*.txt", "**/*.txt", "linkdir/*", "linkdir/x.txt"])
    assert out.ok
    assert [o.path for o in out.outputs] == ["alias.txt", "real.txt"]
    assert out.outputs[0].sha256 == _sha(b"ok")
    assert "leak.txt" in caplog.text


def test_safe_join(tmp_path: Path) -> None:
    assert safe_join(tmp_path, "a/b.txt") == tmp_path / "a" / "b.txt"
    for bad in ("/etc/passwd", "..", "../x", "a/../../x", "", ".", "a\\b", "a\x00b"):
        with pytest.raises(ValueError):
            safe_join(tmp_path, bad)
    (tmp_path / "up").symlink_to(tmp_path.parent)
    with pytest.raises(ValueError):
        safe_join(tmp_path, "up/escape.txt")
    (tmp_path / "inner").mkdir()
    (tmp_path / "in").symlink_to(tmp_path / "inner")
    assert safe_join(tmp_path, "in/ok.txt") == tmp_path / "in" / "ok.txt"


def test_planted_tmp_symlink_is_not_used_as_tmpdir(tmp_path: Path) -> None:
    (tmp_path / "tmp").symlink_to("/")
    out = _run(tmp_path, ["sh", "-c", 'echo "$TMPDIR"'])
    assert out.stdout.decode().strip() == str(tmp_path.resolve())


# --------------------------------------------------------------------------- docker without an engine


def test_docker_unreachable_is_a_clear_error(tmp_path: Path) -> None:
    def no_engine() -> object:
        raise ConnectionError("no socket here")

    ex = Executor(docker_client_factory=no_engine)
    assert not ex.docker_available()
    out = _run(tmp_path, ["true"], executor=ex, runtime="docker", image="whatever:1")
    ex.close()
    assert out.exit_code is None and out.error is not None and "docker engine not reachable" in out.error


@pytest.mark.skipif(os.geteuid() == 0, reason="root is exempt from RLIMIT_NPROC")
def test_process_limit_as_user(tmp_path: Path) -> None:
    script = "for i in $(seq 40); do sleep 5 & done; wait"
    out = _run(tmp_path, ["sh", "-c", script], limits=Limits(max_processes=10, timeout_s=20))
    assert b"fork" in out.stderr.lower() or out.exit_code != 0


def test_not_executable_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "script.sh").write_text("#!/bin/sh\necho hi\n")
    out = _run(tmp_path, ["./script.sh"])
    assert out.error is not None and "not executable" in out.error


# --------------------------------------------------------------------------- the spawner


def test_tasks_share_one_spawner_that_runs_them_under_the_limits(tmp_path: Path) -> None:
    async def scenario() -> list[TaskOutcome]:
        ex = Executor(kill_grace_s=0.5)
        try:
            runs = [TaskRun(f"t{i}", ("sh", "-c", f"ulimit -v; echo {i}; echo $PPID"), {}, tmp_path, (),
                            Limits(memory_bytes=700 << 20)) for i in range(20)]
            return await asyncio.gather(*(ex.run(r) for r in runs))
        finally:
            ex.close()

    outs = asyncio.run(scenario())
    lines = [o.stdout.decode().split() for o in outs]
    assert [x[:2] for x in lines] == [[str(700 << 10), str(i)] for i in range(20)]
    assert len({x[2] for x in lines}) == 1  # one parent: the spawner


def test_a_killed_spawner_fails_its_tasks_clearly_and_the_next_task_gets_a_new_one(tmp_path: Path) -> None:
    async def scenario() -> tuple[TaskOutcome, TaskOutcome]:
        ex = Executor(kill_grace_s=0.5)
        try:
            task = asyncio.create_task(ex.run(TaskRun("long", (PY, "-c", _TREE), {}, tmp_path, (), Limits())))
            child, _ = await asyncio.to_thread(_read_pids, tmp_path / "pids", 2)
            main = psutil.Process(child).ppid()
            os.kill(psutil.Process(main).ppid(), 9)  # the task's parent: the spawner
            first = await task
            os.killpg(main, 9)  # orphaned with its spawner, as with a killed worker: not ours to wait for
            second = await ex.run(TaskRun("next", ("echo", "again"), {}, tmp_path, (), Limits()))
            return first, second
        finally:
            ex.close()

    first, second = asyncio.run(scenario())
    assert first.error is not None and "spawner" in first.error and not first.ok
    assert second.ok and second.stdout == b"again\n"


def test_closing_the_executor_kills_what_still_runs(tmp_path: Path) -> None:
    async def scenario() -> None:
        ex = Executor(kill_grace_s=0.5)
        task = asyncio.create_task(ex.run(TaskRun("long", (PY, "-c", _TREE), {}, tmp_path, (), Limits())))
        await asyncio.to_thread(_read_pids, tmp_path / "pids", 2)
        ex.close()  # the worker left the CE: the spawner sees its stdin close
        await asyncio.wait_for(task, 10)

    asyncio.run(scenario())
    assert _wait_gone(_read_pids(tmp_path / "pids", 2))


def test_a_garbled_request_is_dropped_and_the_spawner_goes_on(tmp_path: Path) -> None:
    spawner = Path(__file__).parents[2] / "bonjourgrid" / "spawner.py"
    req = json.dumps({"op": "run", "id": 1, "argv": ["echo", "ok"], "cwd": str(tmp_path),
                      "env": {"PATH": "/bin:/usr/bin"}})
    p = subprocess.Popen([PY, "-I", str(spawner)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    assert p.stdin is not None and p.stdout is not None and p.stderr is not None
    bad_queue = json.dumps({"op": "run", "id": 2, "argv": ["true"], "cwd": str(tmp_path), "env": {}, "queue": []})
    no_argv = json.dumps({"op": "run", "id": 3, "cwd": str(tmp_path), "env": {}, "queue": ["q", 1]})
    p.stdin.write(f"not json\n{{}}\n{bad_queue}\n{no_argv}\n{req}\n".encode())
    p.stdin.flush()
    replies = {}
    while 1 not in replies:  # stdin stays open: closing it would kill the task
        reply = json.loads(p.stdout.readline())
        replies[reply["id"]] = reply
    p.stdin.close()
    assert p.wait(20) == 0
    assert replies[1]["exit_code"] == 0 and replies[1]["stdout"] == "b2sK"  # base64 of "ok\n"
    # A bad request with an id gets a failed reply: its task fails instead of waiting forever.
    for bad in (2, 3):
        assert "could not read the request" in replies[bad]["error"]
    assert b"dropped a bad request" in p.stderr.read()
