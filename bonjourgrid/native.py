"""The built-in backend: workers pull batches of tasks over the CE bus and run them with `Executor`.

Pull-based dispatch (as in Dask's work stealing or a pilot-job system): a
worker asks for as many tasks as it has free slots plus a small prefetch, so
the coordinator never has to guess a worker's capacity and a fast worker
simply asks more often. Results go back in batches; a worker keeps each
result until the coordinator acknowledges it, and resends it otherwise.

Every message through the broker costs more CPU than a short task (amqtt spends
about a millisecond per QoS 1 message), so the steady state is one exchange per
batch: a worker's `results` message carries its next `pull`, and the
coordinator's `tasks` reply carries the acknowledgements.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import shutil
import time
from collections import deque
from pathlib import Path
from typing import Any

from . import eager
from .backend import Backend, CoordinatorHalf, WorkerHalf
from .bus import BusError
from .coordinator import CoordinatorCE
from .datasrv import DataError, StorageError, fetch, upload
from .envelope import Envelope
from .execution import Limits, TaskOutcome, TaskRun
from .sandbox import SandboxPool, safe_join
from .worker import WorkerCE

log = logging.getLogger("bonjourgrid.native")

INLINE_MAX = 256 << 10  # outputs up to this size travel inside the result message
RESEND_S = 3.0
# Prefetch: tasks held beyond the running ones, so a slot never waits for a round trip. Short
# tasks want a deep buffer (fewer, bigger pulls); long ones a shallow one, or one worker would
# hoard tasks that idle workers could run. The depth follows the measured task duration.
BUFFER_SECONDS = 0.25
MAX_PREFETCH_PER_SLOT = 32
# Results go with the next pull, when the buffer is half empty; until then, while it is fuller,
# they wait at most this long (or for this many more) to share one message. An idle worker, or
# one about to run dry, sends at once.
COALESCE_S = 0.05
COALESCE_MAX = 64
# Processes: tasks per slot handed to the spawner, which starts each as a slot frees
# (TaskRun.queue). More than one ahead lets the spawner report several ends in one write, and
# the worker hand over several tasks in one: a task's worth of wake-ups on each side saved.
# Each task ahead holds its sandbox, with its copy of the inputs: with big inputs, one ahead.
AHEAD_PER_SLOT = 8
AHEAD_INPUT_BYTES = 64 << 20  # per slot, in the sandboxes of the tasks ahead


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class NativeBackend(Backend):
    name = "native"
    description = "built in: tasks as processes or docker containers, pulled by the workers over the CE bus"

    def coordinator(self, ce: CoordinatorCE) -> CoordinatorHalf:
        return NativeCoordinator(ce)

    def worker(self, worker: WorkerCE) -> WorkerHalf:
        return NativeWorker(worker)


class NativeCoordinator(CoordinatorHalf):
    ce: CoordinatorCE

    async def on_message(self, env: Envelope) -> None:
        node = env.sender
        if env.kind not in ("pull", "results"):
            return
        acks: list[list[int]] = []
        items = env.body.get("items")
        if env.kind == "results" and isinstance(items, list):
            # Acknowledged once committed, not synced: the worker keeps its results until released.
            acks = await self.ce.accept_results(node, items, durable=False)
        try:
            n = int(env.body.get("n", 0))
        except (TypeError, ValueError):
            n = 0
        # n = 0 too: tasks owed from an earlier ask (the journal refused them) go with any message
        tasks = await self.ce.assign(node, n) if node in self.ce.dispatch.workers and 0 <= n <= 10_000 else []
        if (acks or tasks) and not self.ce._done.is_set():
            await self._send_tasks(node, tasks, acks)

    async def worker_back(self, node_id: str, running: set[int]) -> None:
        """Tasks offered while the bus was failing may never have arrived: those it lacks run again."""
        given = {i for i, n in self.ce.dispatch.running.items() if n == node_id}
        if given - running:
            self.ce.requeue_orphans_later(node_id, given - running)

    async def tasks_requeued(self) -> None:
        for node, tasks in (await self.ce.grant_waiting()).items():
            await self._send_tasks(node, tasks)

    async def worker_lost(self, node_id: str, requeued: list[int]) -> None:
        await self.tasks_requeued()

    async def cancel(self) -> None:
        for node in list(self.ce.dispatch.workers):
            with contextlib.suppress(Exception):
                await self.ce.send(node, "cancel", {})

    async def _send_tasks(self, node: str, tasks: list[tuple[int, int]], acks: list[list[int]] | None = None) -> None:
        if not tasks and not acks:
            return
        specs = self.ce.job.tasks
        items = [{"index": i, "attempt": a, "argv": list(specs[i].argv), "env": specs[i].env} for i, a in tasks]
        await self.ce.send(node, "tasks", {"items": items, "acks": acks or []})


class NativeWorker(WorkerHalf):
    worker: WorkerCE

    def __init__(self, worker: WorkerCE) -> None:
        super().__init__(worker)
        self.executor = worker.daemon.task_executor()  # the node's: its spawners outlive a CE
        self.backlog: deque[dict[str, Any]] = deque()  # tasks received, waiting for a free slot
        self.outstanding = 0  # tasks asked for and not yet received
        self.in_hand = 0  # received and not yet finished
        self.unacked: dict[tuple[int, int], dict[str, Any]] = {}
        # Acknowledged results are kept until the CE releases us: after a failover the successor's
        # journal may lag behind the old coordinator's, and it gets them again (it records each once).
        # The coordinator acknowledges them before they are synced to its disk, and syncs before
        # it releases us (CoordinatorCE.accept_results): until then this is their second copy.
        self.acked: dict[tuple[int, int], dict[str, Any]] = {}
        self.running_now: set[int] = set()
        self.sent_at: dict[tuple[int, int], float] = {}
        self._results: list[dict[str, Any]] = []
        # The sender sleeps on this future; `_kick` resolves it. (An Event waited on through
        # wait_for cost a task and two more turns of the event loop per message.)
        self._wake: asyncio.Future[None] | None = None
        self._kicked = False
        self._flush_timer: asyncio.TimerHandle | None = None
        self._inputs_ready: asyncio.Task[Path] | None = None
        self._running: set[asyncio.Task[None]] = set()
        # Docker containers start only on a free slot.
        self._queued = worker.config.get("runtime", "process") == "process"
        self._free_slots = worker.slots * self._per_slot(worker.config)
        self.sandboxes = SandboxPool(worker.dir / "tasks")
        self._avg_task_s = 1.0  # pessimistic until measured: start with a shallow buffer
        self._send_failing = False

    async def run(self) -> None:
        cfg = self.worker.config
        self._inputs_ready = asyncio.ensure_future(self._fetch_inputs(cfg.get("inputs") or []))
        sender = asyncio.ensure_future(self._send_results_forever())
        if cfg.get("runtime", "process") == "process":
            self.executor.prepare(self._limits())
        try:
            await self._pull()
            await asyncio.sleep(0)  # the pull leaves now; the sandboxes are made while it travels
            try:
                self.sandboxes.reserve(self.worker.slots)
            except OSError as e:  # a full disk, say: each task then reports it when it needs its sandbox
                log.warning("CE %s: could not prepare the task sandboxes: %s", self.worker.ce, e)
            await asyncio.get_running_loop().create_future()  # tasks come in `on_message`, until cancelled
        finally:
            sender.cancel()
            self.backlog.clear()  # nothing starts once the CE is over (a task ending would start the next)
            for t in list(self._running):
                t.cancel()

    @staticmethod
    def _per_slot(cfg: dict[str, Any]) -> int:
        """Tasks in the executor per slot: the running one and those waiting in the spawner."""
        if cfg.get("runtime", "process") != "process":
            return 1
        inputs = sum(int(f.get("size", 0)) for f in cfg.get("inputs") or [])
        return AHEAD_PER_SLOT if inputs * (AHEAD_PER_SLOT - 1) <= AHEAD_INPUT_BYTES else 2

    def _running_dry(self) -> bool:
        """Nothing buffered beyond the running tasks: ask for more now, not with the next batch."""
        return self.in_hand + self.outstanding <= self.worker.slots

    def _want(self) -> int:
        """How many tasks to ask for: the slots plus a buffer of about BUFFER_SECONDS of work each.

        Only once the buffer is at least half empty, so that pulls stay few and big.
        """
        slots = self.worker.slots
        depth = max(1, min(MAX_PREFETCH_PER_SLOT, round(BUFFER_SECONDS / max(self._avg_task_s, 1e-4))))
        want = slots + slots * depth - self.in_hand - self.outstanding
        return want if self._running_dry() or want >= max(slots * depth // 2, 1) else 0

    async def _pull(self) -> None:
        """Ask for work on its own (start, reattach); in the steady state pulls ride on results."""
        if not self._running_dry():
            return
        want = self._want()
        try:
            await self.worker.publish("pull", {"n": want})
        except BusError:
            return  # no coordinator right now: `reattached` asks again
        self.outstanding += want

    async def on_message(self, env: Envelope) -> None:
        if env.kind == "tasks":
            for index, attempt in env.body.get("acks") or []:
                if (index, attempt) in self.unacked:
                    self.acked[(index, attempt)] = self.unacked.pop((index, attempt))
                self.sent_at.pop((index, attempt), None)
            items = env.body.get("items") or []
            self.outstanding = max(self.outstanding - len(items), 0)
            for item in items:
                self.in_hand += 1
                self.running_now.add(int(item["index"]))
                self.backlog.append(item)
            self._start_backlog()
        elif env.kind == "cancel":
            for t in list(self._running):
                t.cancel()

    async def running(self) -> list[int]:
        """Tasks in hand (running or queued here): a new coordinator leaves them to us."""
        return sorted(self.running_now)

    async def reattached(self) -> None:
        """A new coordinator: resend every result we hold, and ask for work again."""
        for key, result in self.acked.items():
            self.unacked.setdefault(key, result)
        self.acked.clear()
        await self.resumed()

    async def resumed(self) -> None:
        """Resend what was not acknowledged now, and ask again for what we asked for: the tasks
        offered meanwhile may be lost (the coordinator reruns those we do not have)."""
        self._results = list(self.unacked.values())
        self.sent_at.clear()
        self._kick()
        self.outstanding = 0
        await self._pull()

    # ---------------------------------------------------------------- tasks --

    async def _fetch_inputs(self, inputs: list[dict[str, Any]]) -> Path:
        """Each input once per CE, checked by sha256, into a cache the sandboxes copy from."""
        cache = self.worker.dir / "inputs"
        if inputs:
            cache.mkdir(parents=True, exist_ok=True)
        for f in inputs:
            dest = cache / f["sha256"]
            if not dest.exists():
                if not self.worker.data_url:
                    raise DataError("the coordinator announced no data endpoint")
                await asyncio.to_thread(fetch, self.worker.data_url, self.worker.key, self.worker.ce,
                                        f["sha256"], dest)
        return cache

    def _start_backlog(self) -> None:
        """Start what waits, while slots are free: each up to its hand-over to the spawner, in
        this turn of the event loop (`eager`)."""
        while self.backlog and self._free_slots:
            item = self.backlog.popleft()
            self._free_slots -= 1
            try:
                task = eager.start(self._run_one(item))
            except Exception:  # a bug of ours, as a task that fails later would be: said, not fatal
                log.exception("CE %s: task %s: the worker failed", self.worker.ce, item.get("index"))
                continue
            if task is not None:
                self._running.add(task)
                task.add_done_callback(self._running.discard)

    async def _run_one(self, item: dict[str, Any]) -> None:
        index, attempt = int(item["index"]), int(item["attempt"])
        self.running_now.add(index)
        sandbox: Path | None = None
        try:
            try:
                sandbox = self.sandboxes.take()
            except OSError as e:  # a full disk, say: a failed attempt (retried elsewhere), not a lost task
                outcome = TaskOutcome.failure(f"could not make the task's sandbox: {e}")
            else:
                try:
                    outcome = await self._attempt(item, index, attempt, sandbox)
                except Exception as e:  # a bug of ours: the attempt fails (and is retried), loudly
                    log.exception("CE %s: task %d, attempt %d: the worker failed", self.worker.ce, index, attempt)
                    outcome = TaskOutcome.failure(f"the worker failed to run the task: {e!r}")
            result = await self._result(index, attempt, sandbox, outcome)
        finally:
            self.in_hand -= 1
            self.running_now.discard(index)
            self._free_slots += 1
            if self.backlog:  # the next turn: a task that fails at once must not start the next one inside it
                asyncio.get_running_loop().call_soon(self._start_backlog)
        self.unacked[(index, attempt)] = result
        self._results.append(result)
        if self.in_hand == 0 or self._running_dry() or len(self._results) >= COALESCE_MAX or self._want() > 0:
            self._kick()  # idle, about to run dry, or the buffer is half empty: the pull rides along
        elif self._flush_timer is None:
            self._flush_timer = asyncio.get_running_loop().call_later(COALESCE_S, self._kick)
        if sandbox is not None:
            self.sandboxes.give_back(sandbox)

    async def _attempt(self, item: dict[str, Any], index: int, attempt: int, sandbox: Path) -> TaskOutcome:
        cfg = self.worker.config
        assert self._inputs_ready is not None
        try:
            cache = await asyncio.shield(self._inputs_ready)
            inputs = cfg.get("inputs") or []
            if inputs:  # copying can take a while: off the event loop
                await asyncio.to_thread(self._prepare, sandbox, cache, inputs)
        except (DataError, OSError, ValueError) as e:
            return TaskOutcome.failure(f"could not stage inputs: {e}")
        run = TaskRun(
            task_id=f"{self.worker.ce}/{index}/{attempt}",
            argv=tuple(item["argv"]),
            env=dict(item.get("env") or {}),
            sandbox=sandbox,
            output_globs=tuple(cfg.get("outputs") or ()),
            limits=self._limits(),
            runtime=cfg.get("runtime", "process"),
            image=cfg.get("image"),
            network=bool(cfg.get("network", False)),
            queue=(self.worker.ce, self.worker.slots) if self._queued else None,
        )
        outcome = await self.executor.run(run)
        self._avg_task_s = 0.8 * self._avg_task_s + 0.2 * max(outcome.ended_at - outcome.started_at, 0.0)
        return outcome

    def _limits(self) -> Limits:
        cfg = self.worker.config
        disk = cfg.get("disk_bytes")
        return Limits(cpus=int(cfg.get("cpus", 1)), memory_bytes=int(cfg.get("memory_bytes", 512 << 20)),
                      timeout_s=cfg.get("timeout_s"), disk_bytes=None if disk is None else int(disk))

    @staticmethod
    def _prepare(sandbox: Path, cache: Path, inputs: list[dict[str, Any]]) -> None:
        for f in inputs:
            dest = safe_join(sandbox, f["dest"])
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(cache / f["sha256"], dest)  # a copy: a task may change its inputs

    async def _result(self, index: int, attempt: int, sandbox: Path | None, o: TaskOutcome) -> dict[str, Any]:
        inline: dict[str, str] = {}
        error = o.error
        for out in o.outputs if o.ok and sandbox is not None else ():
            path = sandbox / out.path
            if out.size <= INLINE_MAX:
                try:
                    inline[out.path] = base64.b64encode(path.read_bytes()).decode()
                except OSError as e:  # gone or unreadable since it was hashed (an escaped process?)
                    error = f"could not read output {out.path}: {e}"
            else:
                try:
                    await self._upload(index, attempt, out.path, path, out.sha256)
                except DataError as e:
                    error = str(e)
        return {
            "index": index,
            "attempt": attempt,
            "ok": o.ok and error is None,
            "exit_code": o.exit_code,
            "started_at": o.started_at,
            "ended_at": o.ended_at,
            "stdout": base64.b64encode(o.stdout).decode(),
            "stderr": base64.b64encode(o.stderr).decode(),
            "stdout_truncated": o.stdout_truncated,
            "stderr_truncated": o.stderr_truncated,
            "timed_out": o.timed_out,
            "error": error,
            "outputs": [x.to_dict() for x in o.outputs] if o.ok else [],
            "inline": inline,
        }

    async def _upload(self, index: int, attempt: int, rel: str, path: Path, sha: str) -> None:
        """One output file to the coordinator. If it has no room for it (its disk is full), the task
        did nothing wrong: keep the file, and its slot, and try again until the CE ends."""
        warned = False
        while True:
            try:
                return await asyncio.to_thread(upload, self.worker.data_url or "", self.worker.key, self.worker.ce,
                                               index, attempt, rel, path, sha)
            except StorageError as e:
                if not warned:
                    log.warning("CE %s: task %d: %s; trying again every %gs", self.worker.ce, index, e, RESEND_S)
                    warned = True
                await asyncio.sleep(RESEND_S)

    def _kick(self) -> None:
        """Have the sender run once this turn of the event loop is over: results that end together
        go in one message."""
        self._kicked = True
        if self._wake is not None:
            _resolve(self._wake)

    async def _send_results_forever(self) -> None:
        """Batch whatever finished since the last send, with the next pull; resend what was never acknowledged."""
        loop = asyncio.get_running_loop()
        while True:
            if not self._kicked:
                self._wake = wake = loop.create_future()
                timer = loop.call_later(RESEND_S, _resolve, wake)
                try:
                    await wake
                finally:
                    timer.cancel()
                    self._wake = None
            self._kicked = False
            if self._flush_timer is not None:
                self._flush_timer.cancel()
                self._flush_timer = None
            now = time.monotonic()
            batch, self._results = self._results, []
            fresh = {(r["index"], r["attempt"]) for r in batch}
            batch += [r for k, r in self.unacked.items()
                      if k not in fresh and now - self.sent_at.get(k, now) >= RESEND_S]
            if not batch:
                continue
            for r in batch:
                self.sent_at[(r["index"], r["attempt"])] = now
            want = self._want()
            try:
                await self.worker.publish("results", {"items": batch, "n": want})
            except Exception as e:  # the bus is gone: results stay unacked and are resent
                (log.debug if self._send_failing else log.warning)(
                    "CE %s: could not send %d result(s): %s", self.worker.ce, len(batch), e)
                self._send_failing = True  # said once per outage: every task that ends would say it again
            else:
                self.outstanding += want
                self._send_failing = False
