"""Run one task attempt on a worker: as a local process under rlimits, or in a Docker container.

The worker half of the native backend hands a :class:`TaskRun` to :meth:`Executor.run` and gets a
:class:`TaskOutcome` back.  ``run`` never raises for a task that fails or cannot start (that is
the task's problem, reported in ``TaskOutcome.error``); it raises only ``asyncio.CancelledError``
when the awaiting asyncio task is cancelled, and then only after the process group or container
has been killed.  To stop a task and still get an outcome (``cancelled=True``), call
:meth:`Executor.cancel` instead.

Process runtime caveats (documented, not bugs):

* ``memory_bytes`` is applied as RLIMIT_AS (virtual address space, per process, not RSS, not
  summed over the group).  Runtimes that reserve large virtual areas (JVM, Go, many threads with
  8 MiB stacks) may fail well below the limit; use the docker runtime for real memory accounting.
* ``max_processes`` maps to RLIMIT_NPROC, which the kernel counts per *user* (threads included):
  the limit is set to "this user's current task count + max_processes".  Root ignores it, so
  when the worker runs as root the process runtime cannot bound processes (docker can).
* ``cpus`` is informative for processes (nothing is pinned); docker gets ``nano_cpus``.
* A task that calls setsid() itself leaves our process group and escapes the group kill; the
  spawner, the tasks' subreaper, kills it within half a second of the task's end (spawner.py).
  Processes that clear their environment (how they are matched to their task) wait until no task runs.
* An exit by signal gives a negative ``exit_code`` (-9 for SIGKILL), as with Popen.  When we
  killed it (timeout, cancel) ``exit_code`` is None.  Docker reports 128+N for a signal instead.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import os
import resource
import shutil
import stat
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import psutil

from bonjourgrid.sandbox import OutputFile, check_glob, collect_outputs, safe_join
from bonjourgrid.spawner import Capture, SpawnerClient, SpawnerDied
from bonjourgrid.units import format_size

__all__ = [
    "Executor",
    "Limits",
    "OutputFile",
    "TaskOutcome",
    "TaskRun",
    "collect_outputs",
    "safe_join",
]

log = logging.getLogger(__name__)

_READ_CHUNK = 64 << 10
_DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
CONTAINER_WORKDIR = "/work"
MAX_SPAWNERS = 4  # one per set of limits; a CE has one


@dataclass(frozen=True)
class Limits:
    """Resource limits of one task attempt (see the module docstring for what each runtime enforces)."""

    cpus: int = 1
    memory_bytes: int = 512 << 20
    timeout_s: float | None = None
    max_output_bytes: int = 1 << 20  # per stream; the head is kept and the outcome marked truncated
    max_processes: int | None = 256
    max_open_files: int = 1024  # process runtime: RLIMIT_NOFILE (never above the worker's own hard limit)
    max_file_bytes: int | None = None  # process runtime: RLIMIT_FSIZE, a cheap guard against runaway writes
    disk_bytes: int | None = None  # what the sandbox may hold; more and the attempt is stopped and fails


@dataclass(frozen=True)
class TaskRun:
    """What to run: argv in the sandbox directory, which must already exist and hold the inputs."""

    task_id: str
    argv: tuple[str, ...]
    env: dict[str, str]
    sandbox: Path
    output_globs: tuple[str, ...]
    limits: Limits = field(default_factory=Limits)
    runtime: str = "process"  # or "docker"
    image: str | None = None
    network: bool = False  # docker only; the process runtime cannot take the network away
    # process runtime: (name, slots) starts it only when fewer than `slots` attempts of `name` run.
    # The spawner holds it until then, so it can be handed over before a slot is free (spawner.py).
    queue: tuple[str, int] | None = None


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


@dataclass(frozen=True)
class TaskOutcome:
    """The result of one attempt; ``error`` says why it could not be run at all."""

    exit_code: int | None
    stdout: bytes
    stderr: bytes
    stdout_truncated: bool
    stderr_truncated: bool
    started_at: float
    ended_at: float
    timed_out: bool
    cancelled: bool
    outputs: tuple[OutputFile, ...]
    error: str | None

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not self.timed_out and not self.cancelled and self.error is None

    @classmethod
    def failure(cls, error: str, started_at: float | None = None) -> TaskOutcome:
        """An outcome for a task that never ran (bad request, missing program, engine or image)."""
        now = time.time()
        return cls(None, b"", b"", False, False, started_at or now, now, False, False, (), error)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form; stdout/stderr are base64 so that any bytes round-trip."""
        return {
            "exit_code": self.exit_code,
            "stdout": _b64(self.stdout),
            "stderr": _b64(self.stderr),
            "stdout_truncated": self.stdout_truncated,
            "stderr_truncated": self.stderr_truncated,
            "started_at": self.started_at,
            "ended_at": self.ended_at,
            "timed_out": self.timed_out,
            "cancelled": self.cancelled,
            "outputs": [o.to_dict() for o in self.outputs],
            "error": self.error,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TaskOutcome:
        """Inverse of :meth:`to_dict`; raises KeyError/ValueError/TypeError on malformed input."""
        code = d["exit_code"]
        return cls(
            exit_code=None if code is None else int(code),
            stdout=base64.b64decode(d["stdout"], validate=True),
            stderr=base64.b64decode(d["stderr"], validate=True),
            stdout_truncated=bool(d["stdout_truncated"]),
            stderr_truncated=bool(d["stderr_truncated"]),
            started_at=float(d["started_at"]),
            ended_at=float(d["ended_at"]),
            timed_out=bool(d["timed_out"]),
            cancelled=bool(d["cancelled"]),
            outputs=tuple(OutputFile.from_dict(o) for o in d["outputs"]),
            error=None if d["error"] is None else str(d["error"]),
        )


_PRLIMIT = shutil.which("prlimit")  # util-linux, on every Debian


def _clamped(res: int, value: int) -> int:
    """A child cannot get more than our own hard limit; ask for no more than that."""
    hard = resource.getrlimit(res)[1]
    return value if hard == resource.RLIM_INFINITY else min(value, hard)


def _limit_table(memory_bytes: int, nofile: int, fsize: int | None, nproc: int | None) -> list[tuple[int, str, int]]:
    table = [(resource.RLIMIT_CORE, "core", 0)]
    if memory_bytes > 0:
        table.append((resource.RLIMIT_AS, "as", memory_bytes))
    if nofile > 0:
        table.append((resource.RLIMIT_NOFILE, "nofile", nofile))
    if fsize is not None:
        table.append((resource.RLIMIT_FSIZE, "fsize", fsize))
    if nproc is not None:
        table.append((resource.RLIMIT_NPROC, "nproc", nproc))
    return [(res, name, _clamped(res, value)) for res, name, value in table]


_FOUND_TTL_S = 10.0
_found_on_path: dict[tuple[str, str], tuple[float, str | None]] = {}  # (program, PATH) -> (when found, where)


def _find_program(program: str, path: str, cwd: Path) -> tuple[str | None, str | None]:
    """(where `program` is, why it cannot be started), before it is handed to the spawner.

    A program found on PATH is not looked up again for a few seconds, as a shell's hash table:
    a sweep of short tasks runs the same one thousands of times, and the spawner then execs it
    straight away instead of trying each PATH entry. One that disappears meanwhile is looked
    for on PATH again by the spawner, and fails there clearly ("no such program").
    """
    if "/" not in program:
        now = time.monotonic()
        found_at, where = _found_on_path.get((program, path), (-_FOUND_TTL_S, None))
        if now - found_at < _FOUND_TTL_S:
            return where, None
        found = shutil.which(program, path=path)
        if not found:
            return None, f"no such program: {program!r} (PATH={path})"
        if len(_found_on_path) > 256:
            _found_on_path.clear()
        # Found through a relative PATH entry, it is searched again from the task's directory.
        where = found if os.path.isabs(found) else None
        _found_on_path[(program, path)] = (now, where)
        return where, None
    target = cwd / program
    if not target.exists():
        return None, f"no such program: {program!r}"
    if target.is_dir() or not os.access(target, os.X_OK):
        return None, f"program is not executable: {program!r}"
    return None, None


def _cpu_shares(nice: int) -> int:
    """A container's CPU weight as the scheduler weighs a process of that niceness (1024 at 0, 1.25x a step)."""
    return max(2, round(1024 / 1.25 ** nice))


def _limited_argv(argv: tuple[str, ...], table: list[tuple[int, str, int]]) -> tuple[tuple[str, ...], Any]:
    """(argv, preexec_fn) that start `argv` (the spawner) with the rlimits already in force.

    With util-linux `prlimit` the limits are set by an exec wrapper, so the spawn can use vfork;
    without it, by a preexec_fn (the slow fork path, once per spawner).
    """
    if _PRLIMIT:
        return (_PRLIMIT, *(f"--{name}={value}" for _, name, value in table), "--", *argv), None

    def apply() -> None:  # runs in the forked child: only setrlimit calls
        for res, _, value in table:
            resource.setrlimit(res, (value, value))

    return argv, apply


class _CancelRequest:
    """`Executor.cancel` for one attempt: remembered if it comes early, then passed on to the runtime's way."""

    __slots__ = ("action", "requested")

    def __init__(self) -> None:
        self.requested = False
        self.action: Callable[[], object] | None = None

    def __call__(self) -> None:
        self.requested = True
        if self.action is not None:
            self.action()

    def then(self, action: Callable[[], object]) -> None:
        self.action = action
        if self.requested:
            action()


DISK_CHECK_S = 1.0  # how often a running task's directory is measured against its disk limit
DISK_CHECK_SHARE = 0.05  # at most this share of a core on measuring a task with very many files


def disk_usage(root: Path) -> int:
    """Bytes the files under `root` take on disk (each inode once; symlinks not followed)."""
    total, seen, todo = 0, set(), [str(root)]
    while todo:
        try:
            with os.scandir(todo.pop()) as entries:
                for e in entries:
                    try:
                        st = e.stat(follow_symlinks=False)
                    except OSError:  # removed meanwhile
                        continue
                    if (st.st_dev, st.st_ino) in seen:
                        continue
                    seen.add((st.st_dev, st.st_ino))
                    total += st.st_blocks * 512
                    if stat.S_ISDIR(st.st_mode):
                        todo.append(e.path)
        except OSError:  # removed, or made unreadable by the task: what could be read counts
            continue
    return total


class _DiskWatch:
    """BOINC's disk bound for one attempt: its sandbox is measured while it runs, and the attempt
    is stopped (through its cancel request) once it holds more than the limit."""

    def __init__(self, sandbox: Path, limit: int, cancel: _CancelRequest) -> None:
        self.over: int | None = None  # what it held when it was stopped
        self._task = asyncio.ensure_future(self._watch(sandbox, limit, cancel))

    async def _watch(self, sandbox: Path, limit: int, cancel: _CancelRequest) -> None:
        wait = DISK_CHECK_S
        while True:
            await asyncio.sleep(wait)
            t0 = time.monotonic()
            used = await asyncio.to_thread(disk_usage, sandbox)
            if used > limit:
                self.over = used
                cancel()
                return
            # A directory of very many files takes a while to measure: measure it less often.
            wait = max(DISK_CHECK_S, (time.monotonic() - t0) / DISK_CHECK_SHARE)

    def stop(self) -> None:
        self._task.cancel()


class Executor:
    """Runs task attempts for one worker; keeps the (lazy) docker client and a thread pool for its blocking calls."""

    def __init__(
        self,
        docker_client_factory: Callable[[], Any] | None = None,
        *,
        kill_grace_s: float = 2.0,
        docker_timeout_s: float = 10.0,
        docker_check_ttl_s: float = 30.0,
        max_docker_threads: int = 32,
        task_nice: int = 0,
    ) -> None:
        self._task_nice = task_nice
        self._docker_factory = docker_client_factory or self._default_docker_factory
        self._kill_grace_s = kill_grace_s
        self._docker_timeout_s = docker_timeout_s
        self._docker_check_ttl_s = docker_check_ttl_s
        self._docker_client: Any = None
        self._docker_error: str | None = None
        self._docker_checked_at = float("-inf")
        # Our own pool: each running container holds a thread in wait(), which would starve the default executor.
        self._pool = ThreadPoolExecutor(max_workers=max_docker_threads, thread_name_prefix="bg-docker")
        self._cancels: dict[str, set[_CancelRequest]] = {}
        self._nproc_cache: tuple[float, int] = (float("-inf"), 0)
        self._spawners: dict[tuple[Any, ...], SpawnerClient] = {}

    # ----------------------------------------------------------------- public API

    async def run(self, run: TaskRun) -> TaskOutcome:
        """Run one attempt to its end, timeout or cancel; see the module docstring for cancellation."""
        problem = self._validate(run)
        if problem is not None:
            return TaskOutcome.failure(problem)
        request = _CancelRequest()
        self._cancels.setdefault(run.task_id, set()).add(request)
        disk = None if run.limits.disk_bytes is None else _DiskWatch(run.sandbox, run.limits.disk_bytes, request)
        try:
            if run.runtime == "docker":
                ev = asyncio.Event()
                request.then(ev.set)
                outcome = await self._run_docker(run, ev)
            else:
                outcome = await self._run_process(run, request)
        finally:
            if disk is not None:
                disk.stop()
            requests = self._cancels.get(run.task_id)
            if requests is not None:
                requests.discard(request)
                if not requests:
                    del self._cancels[run.task_id]
        if disk is not None and disk.over is not None:
            return replace(outcome, cancelled=False, error=(
                f"the task used {format_size(disk.over)} of disk in its directory, more than the job's limit of "
                f"{format_size(run.limits.disk_bytes or 0)}: it was stopped"))
        return outcome

    def cancel(self, task_id: str) -> bool:
        """Stop the running attempt(s) of ``task_id``; their ``run`` returns with ``cancelled=True``."""
        requests = self._cancels.get(task_id)
        if not requests:
            return False
        for request in list(requests):
            request()
        return True

    def docker_available(self) -> bool:
        """Whether a docker engine answers; cached for ``docker_check_ttl_s`` (blocks at most one client timeout)."""
        return self._docker_client_or_error()[0] is not None

    def close(self) -> None:
        """Release the thread pool and the docker client's connections."""
        self._pool.shutdown(wait=False, cancel_futures=True)
        for client in self._spawners.values():
            client.close()
        self._spawners.clear()
        if self._docker_client is not None:
            with contextlib.suppress(Exception):
                self._docker_client.close()

    # ----------------------------------------------------------------- shared

    @staticmethod
    def _validate(run: TaskRun) -> str | None:
        if not run.argv or not all(isinstance(a, str) for a in run.argv):
            return "argv must be a non-empty sequence of strings"
        if run.runtime not in ("process", "docker"):
            return f"unknown runtime {run.runtime!r} (expected 'process' or 'docker')"
        if run.runtime == "docker" and not run.image:
            return "the docker runtime needs an image"
        if not os.path.isdir(run.sandbox):
            return f"sandbox {str(run.sandbox)!r} is not a directory"
        if any("\x00" in k or "=" in k or "\x00" in v for k, v in run.env.items()):
            return "environment names must not contain '=' or NUL, values must not contain NUL"
        try:
            for g in run.output_globs:
                check_glob(g)
        except ValueError as e:
            return str(e)
        return None

    @staticmethod
    def _make_tmp(sandbox: Path) -> bool:
        """Create sandbox/tmp for TMPDIR; False if something else (maybe a planted symlink) sits there."""
        tmp = os.path.join(sandbox, "tmp")
        try:
            return stat.S_ISDIR(os.lstat(tmp).st_mode)  # a reused sandbox's; never through a symlink
        except FileNotFoundError:
            pass
        except OSError:
            return False
        try:
            os.mkdir(tmp)
            return True
        except OSError:
            return False

    async def _collect(self, run: TaskRun) -> tuple[OutputFile, ...]:
        if not run.output_globs:
            return ()
        # Hashing can be slow for big outputs: keep it off the event loop.
        return await asyncio.get_running_loop().run_in_executor(
            self._pool, collect_outputs, Path(run.sandbox), tuple(run.output_globs)
        )

    # ----------------------------------------------------------------- process runtime

    def _nproc_limit(self, max_processes: int | None) -> int | None:
        """RLIMIT_NPROC counts all tasks of the real uid, so allow 'what this user runs now + max_processes'."""
        if max_processes is None or os.geteuid() == 0:
            return None  # root is exempt from RLIMIT_NPROC anyway
        at, count = self._nproc_cache
        now = time.monotonic()
        if now - at > 2.0:
            uid = os.getuid()
            count = 0
            for p in psutil.process_iter(["uids", "num_threads"]):
                uids = p.info.get("uids")
                if uids is not None and uids.real == uid:
                    count += p.info.get("num_threads") or 1
            self._nproc_cache = (now, count)
        return count + max_processes

    @staticmethod
    def _process_env(run: TaskRun, tmp_ok: bool) -> dict[str, str]:
        sandbox = os.path.abspath(run.sandbox)
        env = {
            "PATH": os.environ.get("PATH") or _DEFAULT_PATH,
            "HOME": sandbox,
            "LANG": "C.UTF-8",
            "TMPDIR": os.path.join(sandbox, "tmp") if tmp_ok else sandbox,
            "BONJOURGRID_TASK_ID": run.task_id,
        }
        env.update(run.env)
        return env

    def prepare(self, limits: Limits) -> None:
        """Start the spawner for these limits now (a Python start-up, ~0.1 s), not with the first task."""
        self._spawner(limits)

    def _spawner(self, limits: Limits) -> SpawnerClient:
        """The running spawner for these limits, started on first use (and again if it died)."""
        key = (limits.memory_bytes, limits.max_open_files, limits.max_file_bytes, limits.max_processes)
        loop = asyncio.get_running_loop()
        client = self._spawners.get(key)
        if client is not None and client.alive() and client.loop is loop:
            return client
        if client is not None:
            client.close()
        if len(self._spawners) >= MAX_SPAWNERS:  # limits of jobs long gone
            oldest = min(self._spawners, key=lambda k: self._spawners[k].last_used)
            self._spawners.pop(oldest).close()
        table = _limit_table(limits.memory_bytes, limits.max_open_files, limits.max_file_bytes,
                             self._nproc_limit(limits.max_processes))
        argv, preexec = _limited_argv((), table)
        client = self._spawners[key] = SpawnerClient(argv, preexec, self._task_nice)
        return client

    async def _run_process(self, run: TaskRun, cancel: _CancelRequest) -> TaskOutcome:
        limits = run.limits
        sandbox = Path(run.sandbox)
        env = self._process_env(run, self._make_tmp(sandbox))
        started = time.time()
        executable, problem = _find_program(run.argv[0], env["PATH"], sandbox)
        if problem:
            return TaskOutcome.failure(problem, started)
        try:
            spawner = self._spawner(limits)
            rid, reply = await spawner.submit({"argv": list(run.argv), "executable": executable,
                                               "cwd": os.path.abspath(sandbox), "env": env,
                                               "timeout": limits.timeout_s, "cap": limits.max_output_bytes,
                                               "grace": self._kill_grace_s, "queue": run.queue})
        except (OSError, SpawnerDied) as e:
            return TaskOutcome.failure(f"could not start the task spawner: {e}", started)
        cancel.then(lambda: spawner.cancel(rid))  # its reply then says `cancelled`
        try:
            msg = await reply
        except SpawnerDied as e:
            return TaskOutcome.failure(f"the task spawner died while running the task: {e}", started)
        except BaseException:
            # asyncio cancellation (or anything unexpected): have the group killed, wait for its
            # end, then let it propagate.
            spawner.cancel(rid)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(spawner.replied(rid), self._kill_grace_s + 5)
            raise
        if msg.get("error"):
            return TaskOutcome.failure(str(msg["error"]), started)
        if msg.get("escaped"):
            log.warning("task %s: output pipes still open after exit; an escaped process holds them", run.task_id)
        outputs = await self._collect(run)
        return TaskOutcome(
            exit_code=msg["exit_code"],
            stdout=base64.b64decode(msg["stdout"]),
            stderr=base64.b64decode(msg["stderr"]),
            stdout_truncated=bool(msg["stdout_truncated"]),
            stderr_truncated=bool(msg["stderr_truncated"]),
            started_at=float(msg["started"]),
            ended_at=float(msg["ended"]),
            timed_out=bool(msg["timed_out"]),
            cancelled=bool(msg["cancelled"]),
            outputs=outputs,
            error=None,
        )

    # ----------------------------------------------------------------- docker runtime

    def _default_docker_factory(self) -> Any:
        import docker  # imported here: workers without the docker runtime never pay for it

        return docker.from_env(timeout=int(max(1, self._docker_timeout_s)), max_pool_size=32)

    def _docker_client_or_error(self) -> tuple[Any, str | None]:
        """Create (once) and ping the client; a failure is remembered for the TTL so tasks fail fast."""
        now = time.monotonic()
        if self._docker_client is not None:
            if now - self._docker_checked_at < self._docker_check_ttl_s:
                return self._docker_client, None
            try:
                self._docker_client.ping()
                self._docker_checked_at = now
                return self._docker_client, None
            except Exception as e:
                self._docker_client = None
                self._docker_error = f"docker engine not reachable: {e}"
                self._docker_checked_at = now
                return None, self._docker_error
        if self._docker_error is not None and now - self._docker_checked_at < self._docker_check_ttl_s:
            return None, self._docker_error
        try:
            client = self._docker_factory()
            client.ping()
        except Exception as e:
            self._docker_error = f"docker engine not reachable: {e}"
            self._docker_checked_at = now
            return None, self._docker_error
        self._docker_client, self._docker_error, self._docker_checked_at = client, None, now
        return client, None

    def _container_kwargs(self, run: TaskRun) -> dict[str, Any]:
        import docker.types

        limits = run.limits
        env = {"HOME": CONTAINER_WORKDIR, "TMPDIR": f"{CONTAINER_WORKDIR}/tmp", "LANG": "C.UTF-8"}
        env["BONJOURGRID_TASK_ID"] = run.task_id
        env.update(run.env)
        kw: dict[str, Any] = {
            "image": run.image,
            "command": list(run.argv),
            "working_dir": CONTAINER_WORKDIR,
            "volumes": {str(Path(run.sandbox).resolve()): {"bind": CONTAINER_WORKDIR, "mode": "rw"}},
            "environment": env,
            "user": f"{os.getuid()}:{os.getgid()}",  # outputs in the bind mount belong to the worker's user
            "mem_limit": limits.memory_bytes,
            "memswap_limit": limits.memory_bytes,  # no swap on top of the limit
            "nano_cpus": int(limits.cpus * 1_000_000_000),
            "cpu_shares": _cpu_shares(self._task_nice),
            "cap_drop": ["ALL"],
            "security_opt": ["no-new-privileges"],
            "ulimits": [docker.types.Ulimit(name="core", soft=0, hard=0)],
            "labels": {"bonjourgrid.task_id": run.task_id},
            "stdin_open": False,
            "tty": False,
            "detach": True,
        }
        if limits.max_processes is not None:
            kw["pids_limit"] = limits.max_processes
        if not run.network:
            kw["network_mode"] = "none"
        return kw

    @staticmethod
    def _capped_logs(container: Any, stdout: bool, cap: int) -> tuple[bytes, bool]:
        """Stream one of the demuxed log streams, stopping once past the cap (head kept)."""
        capture = Capture(cap)
        stream = container.logs(stdout=stdout, stderr=not stdout, stream=True, follow=False)
        try:
            for chunk in stream:
                capture.feed(chunk)
                if capture.truncated:
                    break
        finally:
            close = getattr(stream, "close", None)
            if close is not None:
                with contextlib.suppress(Exception):
                    close()
        return bytes(capture.buf), capture.truncated

    @staticmethod
    def _remove(container: Any) -> None:
        try:
            container.remove(force=True)
        except Exception as e:  # already gone, or the engine died: nothing more we can do
            log.debug("removing container %s: %s", getattr(container, "id", "?"), e)

    async def _run_docker(self, run: TaskRun, cancel_ev: asyncio.Event) -> TaskOutcome:
        import docker.errors
        import requests.exceptions

        loop = asyncio.get_running_loop()
        client, problem = await loop.run_in_executor(self._pool, self._docker_client_or_error)
        if client is None:
            return TaskOutcome.failure(problem or "docker engine not reachable")
        self._make_tmp(Path(run.sandbox))
        kwargs = self._container_kwargs(run)
        started = time.time()
        try:
            container = await loop.run_in_executor(self._pool, lambda: client.containers.create(**kwargs))
        except docker.errors.ImageNotFound:
            return TaskOutcome.failure(
                f"docker image {run.image!r} is not present on this worker (the executor never pulls images)", started
            )
        except docker.errors.APIError as e:
            return TaskOutcome.failure(f"docker could not create the container: {e.explanation or e}", started)
        except (docker.errors.DockerException, requests.exceptions.RequestException) as e:
            return TaskOutcome.failure(f"docker engine error: {e}", started)

        timed_out = cancelled = False
        exit_code: int | None = None
        try:
            try:
                await loop.run_in_executor(self._pool, container.start)
            except docker.errors.APIError as e:  # e.g. program not found in the image
                return TaskOutcome.failure(f"docker could not start the container: {e.explanation or e}", started)
            except (docker.errors.DockerException, requests.exceptions.RequestException) as e:
                return TaskOutcome.failure(f"docker engine error while starting the container: {e}", started)
            try:
                started = time.time()
                waiter = loop.run_in_executor(self._pool, lambda: container.wait(timeout=None))
                # If we are cancelled, nobody awaits it any more: retrieve its error so asyncio does not log it.
                waiter.add_done_callback(lambda f: f.cancelled() or f.exception())
                cancel_waiter = asyncio.create_task(cancel_ev.wait())
                try:
                    done, _ = await asyncio.wait(
                        {waiter, cancel_waiter}, timeout=run.limits.timeout_s, return_when=asyncio.FIRST_COMPLETED
                    )
                finally:
                    cancel_waiter.cancel()
                if waiter not in done:
                    cancelled = cancel_waiter in done
                    timed_out = not cancelled
                    grace = max(1, round(self._kill_grace_s))
                    await loop.run_in_executor(self._pool, lambda: container.stop(timeout=grace))
                status = await waiter
                ended = time.time()
                if not (timed_out or cancelled):
                    exit_code = int(status.get("StatusCode", -1))
                cap = run.limits.max_output_bytes
                stdout, out_trunc = await loop.run_in_executor(self._pool, self._capped_logs, container, True, cap)
                stderr, err_trunc = await loop.run_in_executor(self._pool, self._capped_logs, container, False, cap)
            except (docker.errors.DockerException, requests.exceptions.RequestException) as e:
                # The engine died or misbehaved mid-run; the finally clause still tries to remove the container.
                return TaskOutcome.failure(f"docker engine error while the task ran: {e}", started)
        finally:
            # Also on asyncio cancellation: the forced removal (which kills) runs in the pool even if we are
            # cancelled again while waiting for it.
            await asyncio.shield(loop.run_in_executor(self._pool, self._remove, container))

        outputs = await self._collect(run)
        return TaskOutcome(
            exit_code=exit_code,
            stdout=stdout,
            stderr=stderr,
            stdout_truncated=out_trunc,
            stderr_truncated=err_trunc,
            started_at=started,
            ended_at=ended,
            timed_out=timed_out,
            cancelled=cancelled,
            outputs=outputs,
            error=None,
        )
