"""Coordinator half: a central manager and a schedd for the CE; tasks become Condor jobs, job events feed the journal.

Condor decides where and when a task runs; the CE journal stays the truth about
results. Every task without a recorded result is a Condor job (one cluster, one
proc per task, tagged BgCE/BgIndex), so a successor coordinator that builds a new
pool resubmits exactly the tasks the journal still lacks.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

from bonjourgrid.backend import BackendError, CoordinatorHalf
from bonjourgrid.coordinator import CoordinatorCE
from bonjourgrid.journal import InvalidTransitionError
from bonjourgrid.sandbox import collect_outputs, safe_join

from . import config as cfg
from .daemons import Master, pool_port, token, write_password
from .pool import Pool
from .worker import pool_secret

log = logging.getLogger("bonjourgrid.condor")

POLL_S = 0.25
JOB_LEASE_S = 15  # also the claim lease, renewed every third of it
READY_TIMEOUT_S = 90.0
CAPTURE_MAX = 1 << 20  # stdout/stderr kept per task, as with the native backend
JOB_PATH = "/usr/local/bin:/usr/bin:/bin"
HOST_RE = re.compile(r"<\[?([0-9a-fA-F.:]+?)\]?:\d+")


class CondorCoordinator(CoordinatorHalf):
    ce: CoordinatorCE

    def __init__(self, ce: CoordinatorCE) -> None:
        super().__init__(ce)
        self.root = ce.dir / "condor"
        self.local = self.root / "pool"  # owned by the daemons' user (visible to them at the same path)
        self.sub = self.local / "submit"
        self.port = pool_port(ce.address)
        self.collector = f"{ce.address}:{self.port}"
        self.master: Master | None = None
        self.pool: Pool | None = None
        self.live: dict[int, tuple[int, int]] = {}  # task index -> (cluster, proc) while Condor has it
        self.jobs: dict[tuple[int, int], int] = {}  # (cluster, proc) -> task index
        self.attempts: dict[int, tuple[int, str, float]] = {}  # index -> (attempt, node, started)
        self.uid = -1
        self._resubmit = asyncio.Event()
        self._loop: asyncio.Task[None] | None = None
        self._failing: asyncio.Task[None] | None = None
        self.ready_at: float | None = None

    # ------------------------------------------------------------ lifecycle --

    async def start(self) -> dict[str, Any]:
        if self.ce.job.runtime != "process":
            raise BackendError(f"the condor backend runs tasks as processes, not with runtime {self.ce.job.runtime!r}")
        if getattr(self.ce, "resume", False) and self.ce.journal is not None:
            # A takeover: tasks the journal says were running went down with the old pool (a Condor
            # worker holds no result to resend), so every task without a recorded result is resubmitted.
            for node in set(self.ce.dispatch.running.values()):
                await asyncio.to_thread(self.ce.journal.requeue_node, self.ce.job_id, node,
                                        "its HTCondor pool died with the coordinator")
            for index in list(self.ce.dispatch.running):
                self.ce.dispatch.requeue(index)
        await asyncio.to_thread(self._write_files)
        tok = await token(self.local / "condor_config", self.local, cfg.SUBMITTER)
        tokens = self.root / "client" / "tokens.d"
        tokens.mkdir(mode=0o700)
        fd = os.open(tokens / "submitter", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(tok + "\n")
        self.master = Master(self.local / "condor_config", self.local, self.root / "master.out")
        await self.master.start()
        self.pool = Pool(self.root / "client" / "condor_config", self.collector, self.sub / "events.log")
        self._loop = asyncio.ensure_future(self._run())
        return {"collector": self.collector, "port": self.port}

    def _write_files(self) -> None:
        secret = pool_secret(self.ce.key, self.ce.ce)
        for sub in ("log", "spool", "execute", "lock", "run", "submit/in", "submit/t", "submit/o"):
            (self.local / sub).mkdir(parents=True, exist_ok=True)
        write_password(self.local / "passwords.d", secret)  # the daemons' copy (their user owns it)
        write_password(self.root / "client" / "passwords.d", secret)  # the bindings' copy (ours)
        (self.local / "condor_config").write_text(
            cfg.coordinator_config(self.local, self.ce.address, self.port, self.local / "passwords.d"))
        (self.root / "client" / "condor_config").write_text(
            cfg.client_config(self.collector, self.root / "client" / "passwords.d", self.root / "client" / "tokens.d"))
        for f in self.ce.inputs:  # Condor's file transfer sends this tree (its contents) to every job
            dest = safe_join(self.sub / "in", f["dest"])
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(self.ce.dir / "inputs" / f["sha256"], dest)

    async def stop(self) -> None:
        if self._loop is not None:
            self._loop.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._loop
        if self.master is not None:
            await self.master.stop()
        if self.pool is not None:
            self.pool.close()
        await asyncio.to_thread(shutil.rmtree, self.root, True)

    async def cancel(self) -> None:
        if self.pool is not None and self.live:
            with contextlib.suppress(Exception):
                await self.pool.call(self.pool.remove, f'BgCE == "{self.ce.ce}"', "job cancelled")
        self.live.clear()

    async def worker_joined(self, node_id: str, slots: int) -> None:
        """Where the pool is: a worker that followed us from a predecessor's pool rejoins ours."""
        await self.ce.send(node_id, "pool", {"collector": self.collector})

    async def tasks_requeued(self) -> None:
        self._resubmit.set()  # failed attempts the core wants retried: the event loop resubmits them

    # ----------------------------------------------------------------- loop --

    async def _run(self) -> None:
        assert self.pool is not None
        try:
            await self._wait_ready()
            await self._submit(self._unplaced())
            while True:
                events = await self.pool.call(self.pool.new_events)
                for ev in events:
                    await self._on_event(*ev)
                if self._resubmit.is_set():
                    self._resubmit.clear()
                    await self._submit(self._unplaced())
                if self.master is not None and not self.master.alive:
                    raise RuntimeError("condor_master exited; see " + str(self.root / "master.out"))
                await asyncio.sleep(POLL_S)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            log.exception("CE %s: the HTCondor pool failed", self.ce.ce)
            self.ce.message = f"HTCondor pool failed: {e}"
            # In its own task: finishing calls stop(), which cancels and awaits this loop.
            self._failing = asyncio.ensure_future(self.ce._finish("failed"))

    def _log_daemon_tails(self, lines: int = 25) -> None:
        """The daemons' own words, in the node's log: the pool's directory goes with the CE."""
        for name in ("MasterLog", "CollectorLog", "SchedLog"):
            with contextlib.suppress(OSError):
                tail = (self.local / "log" / name).read_text(errors="replace").splitlines()[-lines:]
                log.error("CE %s: end of the pool's %s:\n%s", self.ce.ce, name, "\n".join(tail))

    async def _wait_ready(self) -> None:
        assert self.pool is not None
        await self.pool.call(self.pool.configure)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + READY_TIMEOUT_S
        while True:
            try:
                await self.pool.call(self.pool.schedd)
                break
            except Exception as e:
                if loop.time() > deadline or (self.master and not self.master.alive):
                    self._log_daemon_tails()
                    raise RuntimeError(f"the schedd never came up: {e}") from e
                await asyncio.sleep(0.3)
        self.uid = (self.local / "log").stat().st_uid  # the daemons' user: it must own what they write to
        await asyncio.to_thread(_chown_tree, self.sub, self.uid)
        self.ready_at = loop.time()
        log.info("CE %s: HTCondor pool up, collector %s", self.ce.ce, self.collector)

    def _unplaced(self) -> list[int]:
        d = self.ce.dispatch
        return sorted(i for i in {*d.fresh, *d.retry} if i not in self.live)

    async def _submit(self, indexes: list[int]) -> None:
        if not indexes:
            return
        assert self.pool is not None
        items = []
        for i in indexes:
            spec = self.ce.job.tasks[i]
            env = {"PATH": JOB_PATH, "LANG": "C.UTF-8", **spec.env}
            items.append({"bg_index": str(i), "bg_args": cfg.quote_args(list(spec.argv)),
                          "bg_env": cfg.quote_env(env)})
            await asyncio.to_thread(self._fresh_dir, i)
        cluster = await self.pool.call(self.pool.submit, self._description(), items)
        for proc, i in enumerate(indexes):
            self.live[i] = (cluster, proc)
            self.jobs[(cluster, proc)] = i
        log.info("CE %s: submitted %d task(s) as HTCondor cluster %d", self.ce.ce, len(indexes), cluster)

    def _fresh_dir(self, index: int) -> None:
        iwd = self.sub / "t" / str(index)
        shutil.rmtree(iwd, ignore_errors=True)
        iwd.mkdir(parents=True)
        os.chown(iwd, self.uid, -1)

    def _description(self) -> dict[str, str]:
        job = self.ce.job
        d = {
            "universe": "vanilla",
            "executable": "/usr/bin/env",  # runs argv[0] from PATH, like the native backend
            "transfer_executable": "false",
            "arguments": "$(bg_args)",
            "environment": "$(bg_env)",
            "initialdir": f"{self.sub}/t/$(bg_index)",
            "output": f"{self.sub}/o/$(bg_index).out",
            "error": f"{self.sub}/o/$(bg_index).err",
            "log": str(self.sub / "events.log"),
            "should_transfer_files": "YES",
            "when_to_transfer_output": "ON_EXIT",
            "request_cpus": str(job.cpus),
            "request_memory": str(max(job.memory_bytes >> 20, 1)),
            "request_disk": "1024",
            # A vanished execute node: the shadow gives up reconnecting after this and Condor reruns the job.
            "job_lease_duration": str(JOB_LEASE_S),
            "+BgCE": f'"{self.ce.ce}"',
            "+BgIndex": "$(bg_index)",
        }
        if self.ce.inputs:
            d["transfer_input_files"] = f"{self.sub}/in/"
        if job.timeout_s:
            d["allowed_execute_duration"] = str(int(job.timeout_s))
        return d

    # --------------------------------------------------------------- events --

    async def _on_event(self, kind: str, cluster: int, proc: int, when: float, attrs: dict[str, Any]) -> None:
        index = self.jobs.get((cluster, proc))
        if index is None:
            return
        if kind == "EXECUTE":
            node = self._node_of(str(attrs.get("ExecuteHost", "")))
            attempt = await self._started(index, node)
            if attempt is not None:
                self.attempts[index] = (attempt, node, when)
        elif kind == "JOB_TERMINATED":
            await self._report(index, when, attrs)
        elif kind == "JOB_HELD":
            reason = str(attrs.get("HoldReason", "held"))
            with contextlib.suppress(Exception):
                assert self.pool is not None
                await self.pool.call(self.pool.remove, f"ClusterId == {cluster} && ProcId == {proc}", reason)
            await self._report(index, when, attrs, error=f"HTCondor held the job: {reason}",
                               timed_out="duration" in reason.lower())

    async def _started(self, index: int, node: str) -> int | None:
        """Record a (re)start; None if the task already has its final result (a stale Condor job)."""
        try:
            return await self.ce.task_started(index, node)
        except InvalidTransitionError:
            pass
        # Condor reran the job before the core noticed that its first node was gone: that attempt is over.
        assert self.ce.journal is not None
        if not await asyncio.to_thread(self.ce.journal.requeue, self.ce.job_id, index, "HTCondor reran it"):
            log.info("CE %s: task %d already has its result: ignoring a late HTCondor job", self.ce.ce, index)
            return None
        self.ce.dispatch.requeue(index)
        return await self.ce.task_started(index, node)

    def _node_of(self, sinful: str) -> str:
        m = HOST_RE.search(sinful)
        ip = m[1] if m else sinful
        for node_id, rec in self.ce.daemon.view.nodes.items():
            if ip in rec.addresses:
                return node_id
        return f"condor:{ip}"

    async def _report(self, index: int, when: float, attrs: dict[str, Any], error: str | None = None,
                      timed_out: bool = False) -> None:
        key = self.live.pop(index, None)
        if key is not None:
            self.jobs.pop(key, None)
        if index not in self.attempts:  # held before it ever ran
            attempt = await self._started(index, self.ce.daemon.node_id)
            if attempt is None:
                return
            self.attempts[index] = (attempt, self.ce.daemon.node_id, when)
        attempt, node, started = self.attempts.pop(index)
        item = await asyncio.to_thread(self._result, index, attempt, started, when, attrs, error, timed_out)
        await self.ce.accept_results(node, [item])

    def _result(self, index: int, attempt: int, started: float, ended: float, attrs: dict[str, Any],
                error: str | None, timed_out: bool) -> dict[str, Any]:
        """The same result message the native worker sends, built from Condor's files and events."""
        out, out_cut = _read_capped(self.sub / "o" / f"{index}.out")
        err, err_cut = _read_capped(self.sub / "o" / f"{index}.err")
        code: int | None = None
        if error is None:
            if attrs.get("TerminatedNormally"):
                code = int(attrs.get("ReturnValue", -1))
            else:
                code = -int(attrs.get("TerminatedBySignal", 9))
        ok = error is None and code == 0
        outputs = []
        if ok and self.ce.job.outputs:
            iwd = self.sub / "t" / str(index)
            staged = self.ce.dir / "staging" / f"{index}-{attempt}"
            try:
                found = collect_outputs(iwd, tuple(self.ce.job.outputs))
                for o in found:
                    dest = safe_join(staged, o.path)
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    shutil.move(safe_join(iwd, o.path), dest)
                outputs = [o.to_dict() for o in found]
            except (OSError, ValueError) as e:
                ok, error = False, f"could not collect outputs: {e}"
        return {
            "index": index, "attempt": attempt, "ok": ok, "exit_code": code,
            "started_at": started, "ended_at": ended,
            "stdout": base64.b64encode(out).decode(), "stderr": base64.b64encode(err).decode(),
            "stdout_truncated": out_cut, "stderr_truncated": err_cut,
            "timed_out": timed_out, "error": error, "outputs": outputs if ok else [], "inline": {},
        }


def _read_capped(path: Path) -> tuple[bytes, bool]:
    try:
        with open(path, "rb") as f:
            data = f.read(CAPTURE_MAX + 1)
    except FileNotFoundError:
        return b"", False
    return data[:CAPTURE_MAX], len(data) > CAPTURE_MAX


def _chown_tree(root: Path, uid: int) -> None:
    for dirpath, dirnames, filenames in os.walk(root):
        for name in (dirpath, *(os.path.join(dirpath, n) for n in dirnames + filenames)):
            os.chown(name, uid, -1)
