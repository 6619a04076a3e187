"""The task spawner: a small child process that starts a worker's tasks, already under their rlimits.

Why a separate process: rlimits are per process and inherited. A Python preexec_fn that sets
them forces the slow fork path (about 6 ms per task), and the util-linux `prlimit` exec wrapper
costs a whole extra exec (about 1 ms of CPU per task, as much as `true` itself). The spawner is
started once per set of limits, through `prlimit`, so every task it starts inherits them with a
plain vfork+exec; and the worker's event loop no longer carries the pipes and exit watching of
every task, which run here, on the other core.

Only the standard library: it runs as `python -I -S spawner.py NICENESS`. Protocol, one JSON object per
line: requests on stdin (`run`, `cancel`), replies on stdout (one per `run`, by `id`). When
stdin closes (the worker went away) every task's process group is killed and the spawner exits.

What a task leaves behind ends with it. Its process group is killed when its main process exits;
a process that left the group (setsid, a daemon's double fork) is reparented to the spawner, its
subreaper, and killed at the next sweep once its task has ended: a desktop's owner gets the machine
back with nothing of the grid still running. Each task's environment carries its request id
(`BONJOURGRID_SPAWN`) so that what escaped is matched to its task; one that cleared its
environment is killed when no task runs.

A `run` may name a queue and its slots (`"queue": ["ce-id", 2]`): it then starts only when fewer
than that many of the queue's tasks run, and the next one starts here the moment a task exits.
The worker hands over a task ahead for each slot, so a slot does not sit idle while a task's end
travels to the worker and the next task back (0.7 ms of a 2.3 ms cycle with `true`).
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

READ_CHUNK = 64 << 10
PR_SET_CHILD_SUBREAPER = 36
SPAWN_TAG = "BONJOURGRID_SPAWN"
SWEEP_EVERY_S = 0.5
# While tasks wait for a slot, their worker has nothing to start when one ends: replies are kept
# back, up to this many or this long, to share one write and one wake-up of the worker.
HOLD_REPLIES = 8
HOLD_S = 0.01


def _killpg(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _become_subreaper() -> bool:
    """Orphans of our tasks' escaped processes come to us, not to init (Linux 3.4 and later)."""
    try:
        import ctypes

        return ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _children() -> list[int]:
    """Our direct children: the tasks' main processes and what escaped them."""
    me = os.getpid()
    try:
        with open(f"/proc/{me}/task/{me}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:  # a kernel without CONFIG_PROC_CHILDREN: look at every process's parent
        pass
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat", "rb") as f:
                    stat = f.read()
                if int(stat[stat.rindex(b")") + 2:].split()[1]) == me:
                    found.append(int(name))
            except (OSError, ValueError, IndexError):
                continue
    return found


def _spawn_tag(pid: int) -> int | None:
    """The request id in the process's environment: which task it came from."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            env = f.read()
    except OSError:
        return None
    prefix = SPAWN_TAG.encode() + b"="
    for item in env.split(b"\0"):
        if item.startswith(prefix):
            try:
                return int(item[len(prefix):])
            except ValueError:
                return None
    return None


def _kill_escaped(pid: int) -> None:
    """SIGKILL it, and its group if it made its own (its descendants then come to us in turn)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if os.getpgid(pid) == pid:
            os.killpg(pid, signal.SIGKILL)
        os.kill(pid, signal.SIGKILL)


class Capture:
    """Head-capped capture of one stream: past the cap the data is dropped (and marked) but still read."""

    def __init__(self, cap: int) -> None:
        self.cap = max(0, cap)
        self.buf = bytearray()
        self.truncated = False

    def feed(self, chunk: bytes) -> None:
        room = self.cap - len(self.buf)
        if room > 0:
            self.buf += chunk[:room]
        if len(chunk) > max(room, 0):
            self.truncated = True


@dataclass(frozen=True)
class _Run:
    """A `run` request, checked when it arrives: one that waits in a queue cannot fail later."""

    id: int
    argv: list[str]
    executable: str | None  # argv[0] as the worker found it on PATH (None: search PATH here)
    cwd: str
    env: dict[str, str]
    timeout: float | None
    cap: int
    grace: float
    queue: tuple[str, int] | None  # (name, slots)

    @classmethod
    def parse(cls, req: dict[str, Any]) -> _Run:
        """Raises ValueError, TypeError, KeyError or IndexError on a malformed request."""
        argv, env, queue, timeout = req["argv"], req["env"], req.get("queue"), req.get("timeout")
        if not isinstance(argv, list) or not argv or not isinstance(env, dict):
            raise ValueError("argv must be a non-empty list and env an object")
        executable = req.get("executable")
        return cls(int(req["id"]), [str(a) for a in argv], None if executable is None else str(executable),
                   str(req["cwd"]),
                   {str(k): str(v) for k, v in env.items()}, None if timeout is None else float(timeout),
                   int(req.get("cap", 1 << 20)), float(req.get("grace", 2.0)),
                   None if queue is None else (str(queue[0]), int(queue[1])))


@dataclass
class _Task:
    id: int
    pid: int
    cap: int
    grace: float
    started: float
    deadline: float | None  # the task's timeout
    out: Capture = field(init=False)
    err: Capture = field(init=False)
    open_pipes: int = 2
    ended: float | None = None
    timed_out: bool = False
    cancelled: bool = False
    kill_at: float | None = None  # SIGKILL the group then (after a SIGTERM's grace)
    drain_until: float | None = None  # after the exit: stop waiting for pipes an escaped process holds
    escaped: bool = False
    queue: str | None = None  # frees a slot of this queue when the process exits
    returncode: int | None = None  # as subprocess gives it: -N for a death by signal N

    def __post_init__(self) -> None:
        self.out, self.err = Capture(self.cap), Capture(self.cap)

    def reply(self) -> dict[str, Any]:
        killed = self.timed_out or self.cancelled
        return _reply(self.id, None if killed else self.returncode, self.out, self.err, self.started,
                      self.ended, timed_out=self.timed_out, cancelled=self.cancelled, escaped=self.escaped)


def _reply(tid: int, exit_code: int | None, out: Capture, err: Capture, started: float, ended: float | None, *,
           timed_out: bool = False, cancelled: bool = False, escaped: bool = False) -> dict[str, Any]:
    return {"id": tid, "exit_code": exit_code,
            "stdout": base64.b64encode(out.buf).decode(), "stderr": base64.b64encode(err.buf).decode(),
            "stdout_truncated": out.truncated, "stderr_truncated": err.truncated, "started": started, "ended": ended,
            "timed_out": timed_out, "cancelled": cancelled, "escaped": escaped, "error": None}


class Spawner:
    def __init__(self, out: Any) -> None:
        # epoll itself, not `selectors`: its keys and lookups were a tenth of our time per task.
        self.poller = select.epoll()
        self.watched: dict[int, Any] = {}  # fd -> "stdin", or (task, "out" | "err" | "exit")
        self.tasks: dict[int, _Task] = {}
        self.out = out
        self.inbuf = b""
        self.stdin_open = True
        self.waiting: dict[str, deque[_Run]] = {}  # queue -> requests not started yet
        self.running_in: dict[str, int] = {}  # queue -> its tasks whose process has not exited
        self.unsent: list[bytes] = []
        self.hold_until = 0.0  # replies kept back (while tasks wait for a slot) go by then
        self.sweep_at: float | None = None  # when to look for what escaped ended tasks
        self.devnull = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)  # every task's stdin: opened once
        # What a task must not inherit ignored (Python ignores SIGPIPE and SIGXFSZ for itself).
        self.sigdef = tuple(sig for sig in signal.valid_signals() if signal.getsignal(sig) == signal.SIG_IGN)

    def send(self, msg: dict[str, Any]) -> None:
        """Queued until the end of this round of events: tasks that end together are one write."""
        if not self.unsent:
            self.hold_until = time.monotonic() + HOLD_S
        self.unsent.append(json.dumps(msg).encode())

    def flush(self, *, everything: bool = False) -> None:
        if not self.unsent:
            return
        if not everything and self.waiting and len(self.unsent) < HOLD_REPLIES \
                and time.monotonic() < self.hold_until:
            return
        data = b"\n".join(self.unsent) + b"\n"
        self.unsent.clear()
        try:
            self.out.write(data)
            self.out.flush()
        except BrokenPipeError:  # the worker is gone: nobody to tell
            self.stdin_open = False

    def submit(self, run: _Run) -> None:
        """Start the request now, or queue it behind its queue's running tasks."""
        if run.queue is None:
            self.start(run)
            return
        self.waiting.setdefault(run.queue[0], deque()).append(run)
        self._fill(*run.queue)

    def _fill(self, name: str, slots: int) -> None:
        waiting = self.waiting.get(name)
        while waiting and self.running_in.get(name, 0) < slots:
            self.start(waiting.popleft())
        if not waiting:
            self.waiting.pop(name, None)

    def _slot_freed(self, t: _Task) -> None:
        if t.queue is not None:
            self.running_in[t.queue] -= 1
            waiting = self.waiting.get(t.queue)
            if waiting:
                head = waiting[0].queue
                assert head is not None  # only queued runs wait
                self._fill(t.queue, head[1])

    def start(self, run: _Run) -> None:
        argv, now = run.argv, time.time()
        try:
            os.chdir(run.cwd)
        except OSError as e:
            return self._failed(run.id, f"could not enter the task's directory {run.cwd!r}: {e}", now)
        try:
            try:
                pid, out, err = self._spawn(run, run.executable)
            except FileNotFoundError:
                if run.executable is None:
                    raise
                pid, out, err = self._spawn(run, None)  # gone since the worker found it: look on PATH again
        except FileNotFoundError:
            return self._failed(run.id, f"no such program: {argv[0]!r} (PATH={run.env.get('PATH', '')})", now)
        except PermissionError:
            return self._failed(run.id, f"program is not executable: {argv[0]!r}", now)
        except (OSError, ValueError) as e:
            return self._failed(run.id, f"could not start {argv[0]!r}: {e}", now)
        finally:
            os.chdir("/")  # not left holding the task's directory, which the worker may remove
        queue = None if run.queue is None else run.queue[0]
        t = _Task(run.id, pid, run.cap, run.grace, now,
                  None if run.timeout is None else time.monotonic() + run.timeout, queue=queue)
        self.tasks[run.id] = t
        if queue is not None:
            self.running_in[queue] = self.running_in.get(queue, 0) + 1
        for fd, stream in ((out, "out"), (err, "err")):
            os.set_blocking(fd, False)
            self._watch(fd, (t, stream))
        self._watch(os.pidfd_open(pid), (t, "exit"))

    def _watch(self, fd: int, what: Any) -> None:
        self.poller.register(fd, select.EPOLLIN)
        self.watched[fd] = what

    def _unwatch(self, fd: int) -> None:
        """Stop watching `fd` and close it."""
        self.poller.unregister(fd)
        del self.watched[fd]
        os.close(fd)

    def _spawn(self, run: _Run, executable: str | None) -> tuple[int, int, int]:
        """(pid, its stdout, its stderr): started in its own session, in the current directory.

        posix_spawn (vfork and exec in glibc) takes half the CPU of subprocess.Popen, the
        biggest part of ours per task. Every descriptor of ours is close-on-exec, so the task gets
        only its three. glibc leaves its two internal signals (32 and 33, below SIGRTMIN) ignored
        in the child, as for every program Rust's std or CPython start this way; glibc and musl
        take them back when they need them, and no program may use them.
        """
        program = run.argv[0]
        # The task's PATH, not ours; a name with a slash is relative to the task's directory (ours now).
        task_path = run.env.get("PATH", os.defpath)
        path = executable or (program if "/" in program else shutil.which(program, path=task_path))
        if path is None:
            raise FileNotFoundError(program)
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        try:
            pid = os.posix_spawn(path, run.argv, {**run.env, SPAWN_TAG: str(run.id)},
                                 file_actions=[(os.POSIX_SPAWN_DUP2, self.devnull, 0),
                                               (os.POSIX_SPAWN_DUP2, out_w, 1), (os.POSIX_SPAWN_DUP2, err_w, 2)],
                                 setsid=True, setsigdef=self.sigdef)
        except BaseException:
            os.close(out_r)
            os.close(err_r)
            raise
        finally:
            os.close(out_w)
            os.close(err_w)
        return pid, out_r, err_r

    def _failed(self, tid: int, error: str, started: float) -> None:
        self.send({"id": tid, "error": error, "started": started, "ended": time.time()})

    def stop(self, tid: int, *, cancel: bool) -> None:
        """Timeout or cancel: SIGTERM the group now, SIGKILL it after the grace. A queued task never starts."""
        for name, waiting in self.waiting.items():
            for run in waiting:
                if run.id == tid:
                    waiting.remove(run)
                    now = time.time()
                    self.send(_reply(tid, None, Capture(0), Capture(0), now, now, cancelled=True))
                    if not waiting:
                        del self.waiting[name]
                    return
        t = self.tasks.get(tid)
        if t is None or t.ended is not None or t.kill_at is not None:
            return
        t.cancelled, t.timed_out = cancel, not cancel
        _killpg(t.pid, signal.SIGTERM)
        t.kill_at = time.monotonic() + t.grace

    def on_ready(self, fd: int, t: _Task, what: str) -> None:
        if what == "exit":
            self._unwatch(fd)
            t.returncode = os.waitstatus_to_exitcode(os.waitpid(t.pid, 0)[1])
            t.ended = time.time()
            self._slot_freed(t)  # the next task of its queue starts now, not when the worker hears of this one
            # The attempt ends with its main process: stragglers in the group would hold the pipes open.
            _killpg(t.pid, signal.SIGKILL)
            t.drain_until = time.monotonic() + t.grace
            if self.sweep_at is None:  # and what left the group, once it has had the time to
                self.sweep_at = time.monotonic() + SWEEP_EVERY_S
        else:
            try:
                chunk = os.read(fd, READ_CHUNK)
            except BlockingIOError:
                return
            if chunk:
                (t.out if what == "out" else t.err).feed(chunk)
                return
            self._unwatch(fd)
            t.open_pipes -= 1
        self._maybe_done(t)

    def _maybe_done(self, t: _Task) -> None:
        if t.ended is not None and t.open_pipes == 0:
            del self.tasks[t.id]
            self.send(t.reply())

    def on_time(self, now: float) -> None:
        if self.sweep_at is not None and now >= self.sweep_at:
            self.sweep_at = now + SWEEP_EVERY_S if self.sweep() else None
        for t in list(self.tasks.values()):
            if t.ended is None and t.deadline is not None and now >= t.deadline and t.kill_at is None:
                self.stop(t.id, cancel=False)
            if t.ended is None and t.kill_at is not None and now >= t.kill_at:
                _killpg(t.pid, signal.SIGKILL)
                t.kill_at = now + 3600  # once
            if t.drain_until is not None and now >= t.drain_until and t.open_pipes:
                t.escaped = True  # someone outside the group (setsid) holds a pipe: keep what we have
                for fd, what in list(self.watched.items()):
                    if what != "stdin" and what[0] is t:
                        self._unwatch(fd)
                t.open_pipes = 0
                self._maybe_done(t)

    def sweep(self, everything: bool = False) -> bool:
        """Kill what escaped a task that has ended (all of it with `everything`) and reap what died.

        True while something is left to look at again: escaped processes of running tasks, or
        ones just killed, whose own escaped children come to us next."""
        running = {t.id: t.pid for t in self.tasks.values() if t.ended is None}
        leaders = set(running.values())
        again = False
        for pid in _children():
            if pid in leaders:
                continue
            try:
                if os.waitpid(pid, os.WNOHANG)[0]:
                    continue  # it had died: reaped now
            except ChildProcessError:
                continue
            tag = _spawn_tag(pid)
            if everything or (tag not in running if tag is not None else not running):
                _kill_escaped(pid)
            again = True
        return again

    def next_wakeup(self) -> float | None:
        """Seconds until the next timeout, SIGKILL, end of draining, sweep or held reply, if any."""
        times = [self.sweep_at] if self.sweep_at is not None else []
        if self.unsent:
            times.append(self.hold_until)
        for t in self.tasks.values():
            if t.ended is None:
                if t.kill_at is not None:
                    times.append(t.kill_at)
                elif t.deadline is not None:
                    times.append(t.deadline)
            elif t.open_pipes and t.drain_until is not None:
                times.append(t.drain_until)
        return max(min(times) - time.monotonic(), 0.0) if times else None

    def on_stdin(self, fd: int) -> None:
        data = os.read(fd, READ_CHUNK)
        if not data:
            self.stdin_open = False
            self.waiting.clear()  # nobody to run them for
            self.poller.unregister(fd)
            del self.watched[fd]
            for t in self.tasks.values():
                _killpg(t.pid, signal.SIGKILL)
            return
        self.inbuf += data
        *lines, self.inbuf = self.inbuf.split(b"\n")
        for line in lines:
            req: Any = None
            try:
                req = json.loads(line)
                if req["op"] == "run":
                    self.submit(_Run.parse(req))
                elif req["op"] == "cancel":
                    self.stop(int(req["id"]), cancel=True)
            except (ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
                print(f"bonjourgrid spawner: dropped a bad request: {e!r}", file=sys.stderr, flush=True)
                with contextlib.suppress(Exception):  # its task fails, rather than wait for a reply forever
                    if req["op"] == "run":
                        self._failed(int(req["id"]), f"the task spawner could not read the request: {e!r}",
                                     time.time())

    def run(self, stdin_fd: int) -> None:
        self._watch(stdin_fd, "stdin")
        while self.stdin_open or self.tasks:
            for fd, _events in self.poller.poll(self.next_wakeup()):  # None: until something happens
                what = self.watched.get(fd)
                if what == "stdin":
                    self.on_stdin(fd)
                elif what is not None:  # else closed by an event before it in this round
                    self.on_ready(fd, *what)
            self.on_time(time.monotonic())
            self.flush(everything=not self.stdin_open)
            if not self.stdin_open and self.tasks:
                for t in self.tasks.values():
                    _killpg(t.pid, signal.SIGKILL)
        deadline = time.monotonic() + 2.0  # the worker left: nothing of ours outlives the spawner
        while self.sweep(everything=True) and time.monotonic() < deadline:
            time.sleep(0.02)


def _ignore_signal(signum: int, frame: object) -> None:
    pass


def _default_signals_for_tasks() -> None:
    """An ignored signal stays ignored in every program we exec; a handler does not. So what the
    node ignores (SIGINT and SIGQUIT when a script started it in the background, SIGHUP under
    nohup) and the terminal's Ctrl-C and Ctrl-\\ are caught here by a handler that does nothing:
    the worker decides when we stop, by closing stdin, and the tasks start at the defaults.
    Python's own SIGPIPE and SIGXFSZ are reset at each spawn (`Spawner.sigdef`)."""
    for sig in signal.valid_signals():
        if sig in (signal.SIGPIPE, signal.SIGXFSZ, signal.SIGKILL, signal.SIGSTOP):
            continue
        with contextlib.suppress(OSError, ValueError):
            if sig in (signal.SIGINT, signal.SIGQUIT) or signal.getsignal(sig) == signal.SIG_IGN:
                signal.signal(sig, signal.SIG_DFL if sig == signal.SIGCHLD else _ignore_signal)


def main() -> None:
    _default_signals_for_tasks()
    if len(sys.argv) > 1 and int(sys.argv[1]) > 0:  # never below the niceness the worker itself runs at
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, 0, max(int(sys.argv[1]), os.getpriority(os.PRIO_PROCESS, 0)))
    _become_subreaper()
    Spawner(sys.stdout.buffer).run(sys.stdin.fileno())


if __name__ == "__main__":
    main()


# ------------------------------------------------------------------ the worker's end of the pipe
# (asyncio, also standard library only; imported by execution.py, never run in the spawner)


class SpawnerDied(Exception):
    pass


class SpawnerClient:
    """One running spawner: sends `run` requests and matches the replies to them.

    Plain pipe transports rather than an asyncio subprocess: closing our end of stdin is how the
    spawner is told to stop (it then kills what still runs), and nothing else needs closing.
    Replies are read by the pipe's protocol and handed to their futures at once: through a
    StreamReader and a reading task, each cost another turn of the event loop.
    """

    MAX_REPLY = 16 << 20  # a reply holds two capped, base64-encoded streams

    def __init__(self, argv: tuple[str, ...], preexec: Any, nice: int = 0) -> None:
        """Starts the spawner now (so that concurrent first tasks share it); `submit` waits for the pipes.

        `nice`: the spawner's niceness, which every task inherits."""
        import asyncio

        self.loop = asyncio.get_running_loop()
        self.popen = subprocess.Popen([*argv, sys.executable, "-I", "-S", os.path.abspath(__file__), str(nice)],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, preexec_fn=preexec)
        self.writer: Any = None
        self.pending: dict[int, Any] = {}  # request id -> its reply's future, until the reply comes
        self.waiters: dict[int, Any] = {}  # request id -> futures of `replied`
        self.next_id = 0
        self.unsent: list[bytes] = []
        self.inbuf = b""
        self.dead: str | None = None
        self.last_used = time.monotonic()
        self._ready = self.loop.create_task(self._connect())

    async def _connect(self) -> None:
        import asyncio

        client = self

        class Replies(asyncio.Protocol):
            def data_received(self, data: bytes) -> None:
                client._received(data)

            def connection_lost(self, exc: Exception | None) -> None:
                client._died("the task spawner exited" if exc is None else f"the task spawner failed: {exc}")

        try:
            await self.loop.connect_read_pipe(Replies, self.popen.stdout)
            self.writer, _ = await self.loop.connect_write_pipe(asyncio.Protocol, self.popen.stdin)
        except Exception as e:
            self._died(f"could not talk to the task spawner: {e}")

    def alive(self) -> bool:
        return self.dead is None and self.popen.poll() is None

    async def submit(self, request: dict[str, Any]) -> tuple[int, Any]:
        """Start a task: (request id, future of its reply). The future fails with SpawnerDied.

        Cancelling the future does not stop the task: `cancel` does, and `replied` waits for
        the task's end."""
        await self._ready
        if self.dead is not None or self.popen.returncode is not None:  # poll()ed by the caller just now
            raise SpawnerDied(self.dead or "the task spawner exited")
        self.next_id += 1
        rid = self.next_id
        fut = self.pending[rid] = self.loop.create_future()
        self.last_used = time.monotonic()
        self._write({**request, "op": "run", "id": rid})
        return rid, fut

    def cancel(self, request_id: int) -> None:
        """SIGTERM the task's group, SIGKILL it after the grace; its reply says `cancelled`."""
        self._write({"op": "cancel", "id": request_id})

    def replied(self, request_id: int) -> Any:
        """A future done once the request's reply has come (at once if it has) or the spawner died."""
        fut = self.loop.create_future()
        if request_id in self.pending:
            self.waiters.setdefault(request_id, []).append(fut)
        else:
            fut.set_result(None)
        return fut

    def _write(self, msg: dict[str, Any]) -> None:
        """Queued until the end of this turn of the event loop: tasks handed over together are one write."""
        self.unsent.append(json.dumps(msg).encode())
        if len(self.unsent) == 1:
            self.loop.call_soon(self._flush)

    def _flush(self) -> None:
        data = b"\n".join(self.unsent) + b"\n"
        self.unsent.clear()
        if self.writer is not None and not self.writer.is_closing():
            self.writer.write(data)

    def _received(self, data: bytes) -> None:
        if self.dead is not None:
            return
        *lines, self.inbuf = (self.inbuf + data).split(b"\n")
        try:
            if len(self.inbuf) > self.MAX_REPLY:
                raise ValueError(f"a reply longer than {self.MAX_REPLY} bytes")
            for line in lines:
                msg = json.loads(line)
                rid = msg.get("id")
                fut = self.pending.pop(rid, None)
                if fut is not None and not fut.done():
                    fut.set_result(msg)
                for waiter in self.waiters.pop(rid, ()):
                    if not waiter.done():
                        waiter.set_result(None)
        except Exception as e:  # a reply too long or garbled: this spawner cannot be trusted any more
            self._died(f"the task spawner failed: {e}")  # closing its stdin stops it and its tasks

    def _died(self, reason: str) -> None:
        if self.dead is not None:
            return
        self.dead = reason
        for fut in self.pending.values():
            if not fut.done():
                fut.set_exception(SpawnerDied(reason))
        for waiter in (w for ws in self.waiters.values() for w in ws):
            if not waiter.done():
                waiter.set_result(None)  # no task of a dead spawner runs on
        self.pending.clear()
        self.waiters.clear()
        self.close()
        self.popen.poll()  # reap it if it is gone (never block the event loop on it)

    def close(self) -> None:
        """Closing its stdin makes the spawner kill what still runs and exit."""
        if self.writer is not None:
            self.writer.close()
        elif self.popen.stdin is not None:
            self.popen.stdin.close()
