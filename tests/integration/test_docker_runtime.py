"""The docker runtime against a real local engine, with the busybox image built by tests/docker_image.py.

The ``docker_image`` fixture runs scripts/docker-engine.sh, which installs docker.io if needed,
starts dockerd (vfs, no iptables, no bridge) and imports the image; it skips when not root and
no engine is running.  Containers run with ``network_mode=none``: no packet leaves the machine.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bonjourgrid.execution import Executor, Limits, TaskOutcome, TaskRun

pytestmark = pytest.mark.timeout(300)


@pytest.fixture()
def executor() -> Iterator[Executor]:
    ex = Executor(kill_grace_s=1.0)
    yield ex
    ex.close()


def _run(ex: Executor, sandbox: Path, script: str, image: str, **kw) -> TaskOutcome:
    run = TaskRun(
        task_id=kw.pop("task_id", "d1"),
        argv=("sh", "-c", script),
        env=kw.pop("env", {}),
        sandbox=sandbox,
        output_globs=tuple(kw.pop("globs", ())),
        limits=kw.pop("limits", Limits(memory_bytes=64 << 20)),
        runtime="docker",
        image=image,
        **kw,
    )
    return asyncio.run(ex.run(run))


def _leftover_containers() -> list[str]:
    r = subprocess.run(
        ["docker", "ps", "-aq", "--filter", "label=bonjourgrid.task_id"], capture_output=True, text=True, check=False
    )
    return r.stdout.split()


def test_docker_available(docker_image: str, executor: Executor) -> None:
    assert executor.docker_available()


def test_output_file_and_separate_streams(docker_image: str, executor: Executor, tmp_path: Path) -> None:
    (tmp_path / "in.txt").write_text("hello grid\n")
    script = "tr a-z A-Z < in.txt > out.txt; echo on-stdout; echo on-stderr >&2; echo $FOO; pwd; exit 4"
    out = _run(executor, tmp_path, script, docker_image, env={"FOO": "bar"}, globs=["out.txt"])
    assert out.error is None, out.error
    assert out.exit_code == 4 and not out.ok
    assert out.stdout == b"on-stdout\nbar\n/work\n"
    assert out.stderr == b"on-stderr\n"
    data = (tmp_path / "out.txt").read_bytes()
    assert data == b"HELLO GRID\n"
    assert out.outputs[0].path == "out.txt" and out.outputs[0].sha256 == hashlib.sha256(data).hexdigest()
    st = (tmp_path / "out.txt").stat()
    assert (st.st_uid, st.st_gid) == (os.getuid(), os.getgid())
    assert _leftover_containers() == []


def test_success_is_ok(docker_image: str, executor: Executor, tmp_path: Path) -> None:
    out = _run(executor, tmp_path, "true", docker_image)
    assert out.ok, out


def test_network_is_off(docker_image: str, executor: Executor, tmp_path: Path) -> None:
    out = _run(executor, tmp_path, "cat /proc/net/dev", docker_image)
    assert out.exit_code == 0, out
    ifaces = [line.split(":")[0].strip() for line in out.stdout.decode().splitlines()[2:]]
    assert ifaces == ["lo"]
    # and nothing is reachable: a TCP connect to a (namespace-local) address fails at once
    out = _run(executor, tmp_path, "nc -w 2 10.99.99.1 80 </dev/null", docker_image)
    assert out.exit_code not in (0, None)


def test_big_output_truncated(docker_image: str, executor: Executor, tmp_path: Path) -> None:
    limits = Limits(memory_bytes=64 << 20, max_output_bytes=100_000)
    out = _run(executor, tmp_path, "head -c 1000000 /dev/zero", docker_image, limits=limits)
    assert out.exit_code == 0
    assert len(out.stdout) == 100_000 and out.stdout_truncated and not out.stderr_truncated
    assert out.stdout == bytes(100_000)


def test_memory_limit(docker_image: str, executor: Executor, tmp_path: Path) -> None:
    # tail -c keeps its last N bytes in memory: 200 MB in a 32 MiB container must be OOM-killed.
    script = "head -c 200000000 /dev/zero | tail -c 200000000 >/dev/null"
    out = _run(executor, tmp_path, script, docker_image, limits=Limits(memory_bytes=32 << 20))
    assert out.error is None
    assert out.exit_code == 128 + 9, out  # SIGKILL from the OOM killer, as sh reports it
    # the same pipeline fits in 512 MiB, so it is the limit that bit
    roomy = _run(executor, tmp_path, script, docker_image, limits=Limits(memory_bytes=512 << 20))
    assert roomy.ok, roomy


def test_pids_limit(docker_image: str, executor: Executor, tmp_path: Path) -> None:
    script = "for i in $(seq 30); do sleep 5 & done; echo spawned; wait"
    limits = Limits(memory_bytes=64 << 20, max_processes=10, timeout_s=30)
    out = _run(executor, tmp_path, script, docker_image, limits=limits)
    assert out.exit_code not in (0, None)
    assert b"can't fork" in out.stderr, out.stderr


def test_timeout_kills_container(docker_image: str, executor: Executor, tmp_path: Path) -> None:
    limits = Limits(memory_bytes=64 << 20, timeout_s=1.0)
    t0 = time.monotonic()
    out = _run(executor, tmp_path, "echo started; sleep 120", docker_image, limits=limits)
    assert out.timed_out and out.exit_code is None and not out.ok
    assert out.stdout == b"started\n"
    assert time.monotonic() - t0 < 20
    assert _leftover_containers() == []


def test_cancel(docker_image: str, executor: Executor, tmp_path: Path) -> None:
    async def scenario() -> TaskOutcome:
        run = TaskRun(
            "d-cancel", ("sh", "-c", "touch up; sleep 120"), {}, tmp_path, (), Limits(), "docker", docker_image
        )
        task = asyncio.create_task(executor.run(run))
        while not (tmp_path / "up").exists():
            await asyncio.sleep(0.05)
        executor.cancel("d-cancel")
        return await task

    out = asyncio.run(scenario())
    assert out.cancelled and out.exit_code is None
    assert _leftover_containers() == []


def test_missing_image_is_a_clear_error(docker_image: str, executor: Executor, tmp_path: Path) -> None:
    out = _run(executor, tmp_path, "true", "bonjourgrid/no-such-image:never")
    assert out.exit_code is None and out.error is not None
    assert "not present on this worker" in out.error


def test_missing_program_in_image(docker_image: str, executor: Executor, tmp_path: Path) -> None:
    run = TaskRun("d-np", ("no-such-prog",), {}, tmp_path, (), Limits(), "docker", docker_image)
    out = asyncio.run(executor.run(run))
    assert out.exit_code is None and out.error is not None and "start" in out.error
    assert _leftover_containers() == []


def test_asyncio_cancel_removes_container(docker_image: str, executor: Executor, tmp_path: Path) -> None:
    async def scenario() -> None:
        run = TaskRun(
            "d-acancel", ("sh", "-c", "touch up; sleep 120"), {}, tmp_path, (), Limits(), "docker", docker_image
        )
        task = asyncio.create_task(executor.run(run))
        while not (tmp_path / "up").exists():
            await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(scenario())
    assert _leftover_containers() == []


def test_a_niced_executor_gives_its_containers_a_low_cpu_weight(docker_image: str, tmp_path: Path) -> None:
    """The owner's programs come first in a container too: weight 5 of cgroup v2's 1-10000 (docker
    converts cpu_shares 110, the weight of nice 10, to it), where an executor at 0 gets the default."""
    script = "cat /sys/fs/cgroup/cpu.weight 2>/dev/null || cat /sys/fs/cgroup/cpu/cpu.shares"
    niced = Executor(kill_grace_s=1.0, task_nice=10)
    try:
        low = _run(niced, tmp_path, script, docker_image)
    finally:
        niced.close()
    plain = Executor(kill_grace_s=1.0)
    try:
        default = _run(plain, tmp_path, script, docker_image)
    finally:
        plain.close()
    assert low.ok and default.ok, (low, default)
    assert int(low.stdout) < int(default.stdout), (low.stdout, default.stdout)
    assert int(low.stdout) in (5, 110), low.stdout  # cgroup v2 weight, or v1 shares
