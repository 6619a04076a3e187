"""Coordinator half: serves the CE's BOINC project and turns tasks into workunits and replicas.

Pull model, as BOINC is: a task is claimed (`ce.task_started`) when its first
replica goes out in a scheduler reply. Clients are kicked over the CE bus
(their worker half does a GUI-RPC `project update`) whenever work appears,
so nothing waits for a poll. Every reported result is acknowledged; a task's
result reaches `ce.accept_results` only once a quorum of replicas agreed.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

from bonjourgrid.backend import BackendError, CoordinatorHalf
from bonjourgrid.coordinator import CoordinatorCE

from . import identity
from .httpd import ProjectServer
from .protocol import (
    FILES_UPLOADED,
    MAC_OPEN_NAME,
    TASK_OPEN_NAME,
    InputRef,
    Reported,
    WorkItem,
    build_reply,
    master_page,
    output_file_name,
    parse_request,
)
from .quorum import TaskReplicas, parse_options
from .results import unpack
from .upload import UploadStore
from .wrapper import input_open_name, task_mac, task_script

log = logging.getLogger("bonjourgrid.boinc")

NEXT_RPC_S = 60.0  # a safety net only: work and requeues are announced by kicks
MAX_OUTPUT_BYTES = 1 << 30
PREFETCH_PER_SLOT = 1  # replicas a client holds beyond its running ones
RPC_TIMEOUT_S = 60.0


class BoincCoordinator(CoordinatorHalf):
    ce: CoordinatorCE

    async def start(self) -> dict[str, Any]:
        ce = self.ce
        self.loop = asyncio.get_running_loop()
        try:
            self.replication, self.quorum = parse_options(ce.job.backend_options)
        except (TypeError, ValueError) as e:
            raise BackendError(str(e)) from e
        self.root = ce.dir / "boinc"
        self.downloads = self.root / "download"
        self.unpacked = self.root / "unpacked"
        for d in (self.downloads, self.unpacked):
            d.mkdir(parents=True, exist_ok=True)
        self.auth = identity.authenticator(ce.key, ce.ce)
        self.mac_key = identity.workunit_key(ce.key, ce.ce)
        self.tasks: dict[int, TaskReplicas] = {}
        self.open: dict[int, TaskReplicas] = {}  # not settled yet, in index order
        self.attempts: dict[int, int | None] = {}
        self.by_name: dict[str, int] = {}
        self.slots: dict[str, int] = {}
        self.node_of_ip: dict[str, str] = {}
        self.inputs = await asyncio.to_thread(self._publish_inputs)
        for i in range(len(ce.job.tasks)):
            self._new_task(i)
        self.uploads = UploadStore(self.root / "upload", self._upload_cap)
        port = identity.project_port(ce.key, ce.ce)
        self.server = self._serve(port)
        self.url = identity.project_url(ce.address, self.server.port, ce.ce)
        self.server.start()
        log.info("CE %s: BOINC project at %s (replication %d, quorum %d)", ce.ce, self.url, self.replication,
                 self.quorum)
        return {"url": self.url}

    def _serve(self, port: int) -> ProjectServer:
        kw = dict(master=self._master, scheduler=self._scheduler, upload=self._upload, download_dir=self.downloads)
        try:
            return ProjectServer(self.ce.address, port, self.ce.ce, **kw)  # type: ignore[arg-type]
        except OSError:  # the derived port is taken: any port will do, workers get the URL from the CE
            return ProjectServer(self.ce.address, 0, self.ce.ce, **kw)  # type: ignore[arg-type]

    def _new_task(self, index: int) -> None:
        old = self.tasks.get(index)
        t = TaskReplicas(index, self.replication, self.quorum, seq=old.seq if old else 0)  # names never reused
        self.tasks[index] = self.open[index] = t
        self.attempts[index] = None

    def _publish_inputs(self) -> list[InputRef]:
        """The CE's inputs under download/, named by content, with the md5 BOINC checks."""
        refs = []
        for f in self.ce.inputs:
            name = input_open_name(f["sha256"])
            dest = self.downloads / name
            if not dest.exists():
                src = self.ce.dir / "inputs" / f["sha256"]
                try:
                    os.link(src, dest)
                except OSError:
                    shutil.copyfile(src, dest)
            refs.append(InputRef(name, "", int(f["size"]), _md5(dest), name))
        return refs

    def _task_files(self, index: int) -> list[InputRef]:
        """The workunit's command script and its HMAC, written when the task is first sent."""
        refs = []
        spec = self.ce.job.tasks[index]
        script = task_script(spec.argv, spec.env, self.ce.inputs, self.ce.job.timeout_s).encode()
        for suffix, open_name, data in (("sh", TASK_OPEN_NAME, script),
                                        ("mac", MAC_OPEN_NAME, task_mac(self.mac_key, script).encode())):
            name = f"t{index}.{suffix}"
            path = self.downloads / name
            if not path.exists():
                path.write_bytes(data)
            refs.append(InputRef(name, self._download_url(name), len(data), hashlib.md5(data).hexdigest(), open_name))
        return refs

    def _download_url(self, name: str) -> str:
        return f"{self.url}download/{name}"

    # ------------------------------------------------------------- HTTP side --

    def _master(self) -> bytes:
        return master_page(f"BonjourGrid {self.ce.job.name}", self.url + "cgi").encode()

    def _upload_cap(self, name: str) -> int | None:
        result = name.removesuffix("_out")
        return MAX_OUTPUT_BYTES if name.endswith("_out") and result in self.by_name else None

    def _upload(self, body: bytes) -> bytes:
        return self.uploads.handle(body)

    def _scheduler(self, ip: str, body: bytes) -> bytes:
        """Runs in an HTTP thread: the decisions are made on the CE's event loop."""
        fut = asyncio.run_coroutine_threadsafe(self._rpc(ip, body), self.loop)
        return fut.result(RPC_TIMEOUT_S)

    async def _rpc(self, ip: str, body: bytes) -> bytes:
        req = parse_request(body)
        name = f"BonjourGrid {self.ce.job.name}"
        if not hmac.compare_digest(req.authenticator.encode(), self.auth.encode()):
            log.warning("CE %s: BOINC request from %s with a wrong authenticator", self.ce.ce, ip)
            return build_reply(project_name=name, master_url=self.url, upload_url=self._upload_url(), hostid=None,
                               work=[], acks=[], request_delay=3600, message="wrong authenticator")
        node = self._node(ip)
        for r in req.reported:
            await self._reported(node, r)
        work: list[WorkItem] = []
        if node is not None and node in self.ce.dispatch.workers and req.wants_work and self.ce.state == "running":
            slots = self.slots.get(node, 1)
            held = sum(1 for t in self.open.values() for r in t.inflight() if r.node == node)
            work = await self._pick(node, slots * (1 + PREFETCH_PER_SLOT) - held)
        hostid = None if req.hostid else identity.host_id(node or ip)
        if req.reported or work:
            log.debug("CE %s: BOINC rpc from %s: %d reported, %d sent", self.ce.ce, ip, len(req.reported), len(work))
        return build_reply(project_name=name, master_url=self.url, upload_url=self._upload_url(), hostid=hostid,
                           work=work, acks=[r.name for r in req.reported], next_rpc_delay=NEXT_RPC_S)

    def _upload_url(self) -> str:
        return self.url + "file_upload_handler"

    def _node(self, ip: str) -> str | None:
        node = self.node_of_ip.get(ip)
        if node is None:
            for node_id, rec in self.ce.daemon.view.nodes.items():
                if ip in rec.addresses:
                    self.node_of_ip[ip] = node = node_id
                    break
        return node

    # ------------------------------------------------------------ scheduling --

    async def _pick(self, node: str, room: int) -> list[WorkItem]:
        out: list[WorkItem] = []
        deadline = int(time.time() + (self.ce.job.timeout_s or 86400) * 2 + 3600)
        for index, t in list(self.open.items()):
            if len(out) >= room:
                break
            if not t.eligible(node):
                continue
            if self.attempts[index] is None:
                if index in self.ce.dispatch.running:
                    continue  # the core still counts it as running somewhere: wait for its requeue
                try:
                    self.attempts[index] = await self.ce.task_started(index, node)
                except Exception as e:  # the journal says it is not pending: leave it alone
                    log.warning("CE %s: could not start task %d: %s", self.ce.ce, index, e)
                    continue
            else:
                self._hold(node, index)
            rep = t.issue(node)
            self.by_name[rep.name] = index
            inputs = [InputRef(f.name, self._download_url(f.name), f.nbytes, f.md5, f.open_name) for f in self.inputs]
            out.append(WorkItem(wu_name=f"t{index}", result_name=rep.name, inputs=self._task_files(index) + inputs,
                                report_deadline=deadline, max_output_bytes=MAX_OUTPUT_BYTES,
                                memory_bound=float(self.ce.job.memory_bytes)))
        return out

    def _hold(self, node: str, index: int) -> None:
        """A replica beyond the core's claim still keeps its worker busy (not released as idle)."""
        self.ce.dispatch.hold(node, index)

    def _unhold(self, node: str, index: int) -> None:
        self.ce.dispatch.unhold(node, index)

    async def _reported(self, node: str | None, r: Reported) -> None:
        index = self.by_name.get(r.name)
        t = self.tasks.get(index) if index is not None else None
        if t is None or r.name not in t.replicas:
            return
        outcome = None
        path = self.uploads.path(output_file_name(r.name))
        if r.state == FILES_UPLOADED and path.is_file():
            try:
                outcome = await asyncio.to_thread(unpack, path, self.unpacked / r.name, tuple(self.ce.job.outputs))
            except Exception as e:  # a broken tarball is a lost replica, not a crash
                log.warning("CE %s: result %s unreadable: %s", self.ce.ce, r.name, e)
        else:
            log.info("CE %s: result %s came back without output (BOINC state %d, exit %d)", self.ce.ce, r.name,
                     r.state, r.exit_status)
        with contextlib.suppress(OSError):
            path.unlink()
        rep = t.report(r.name, outcome)
        if rep is None:
            return
        self._unhold(rep.node, t.index)
        await self._settle(t)

    async def _settle(self, t: TaskReplicas) -> None:
        best = t.canonical()
        if best is None:
            if t.wanted():
                await self._kick()
            return
        t.settled = True
        self.open.pop(t.index, None)
        for bad in t.rejected():
            log.warning("CE %s: task %d: result %s from %s rejected (disagrees with the quorum)", self.ce.ce,
                        t.index, bad.name, bad.node[:8])
        for r in t.replicas.values():
            self._unhold(r.node, t.index)
        index, o = t.index, best.outcome
        assert o is not None
        attempt = self.attempts[index]
        if attempt is None:
            attempt = self.attempts[index] = await self.ce.task_started(index, best.node)
        await asyncio.to_thread(self._stage, index, attempt, o.files, [p for p, _, _ in o.outputs])
        item = {"index": index, "attempt": attempt, "ok": o.exit_code == 0, "exit_code": o.exit_code,
                "started_at": o.started_at, "ended_at": o.ended_at,
                "stdout": base64.b64encode(o.stdout).decode(), "stderr": base64.b64encode(o.stderr).decode(),
                "outputs": [{"path": p, "sha256": s, "size": n} for p, s, n in o.outputs], "inline": {},
                "replicas": len(t.done())}
        await self.ce.accept_results(best.node, [item])
        for r in t.replicas.values():
            shutil.rmtree(self.unpacked / r.name, ignore_errors=True)

    def _stage(self, index: int, attempt: int, files: Path | None, paths: list[str]) -> None:
        staged = self.ce.dir / "staging" / f"{index}-{attempt}"
        for rel in paths:
            assert files is not None
            dest = staged / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(files / rel, dest)

    async def _kick(self) -> None:
        """New work: ask every client to contact the scheduler now (no waiting for a poll)."""
        for node in list(self.ce.dispatch.workers):
            with contextlib.suppress(Exception):
                await self.ce.send(node, "kick", {})

    # ------------------------------------------------------------------ hooks --

    async def worker_joined(self, node_id: str, slots: int) -> None:
        self.slots[node_id] = slots
        if any(t.wanted() for t in self.open.values()):
            await self.ce.send(node_id, "kick", {})

    async def worker_lost(self, node_id: str, requeued: list[int]) -> None:
        for t in self.open.values():
            t.lose_node(node_id)
        for index in requeued:
            if index in self.open:
                self.attempts[index] = None
        await self._kick()

    async def tasks_requeued(self) -> None:
        """The core retries a task (its agreed result failed): start it over with fresh replicas."""
        pending = set(self.ce.dispatch.retry) | set(self.ce.dispatch.fresh)
        for index in pending:
            t = self.tasks.get(index)
            if t is not None and t.settled:
                self._new_task(index)
                self.open = dict(sorted(self.open.items()))
            elif t is not None:
                self.attempts[index] = None
        await self._kick()

    async def stop(self) -> None:
        server = getattr(self, "server", None)
        if server is not None:
            await asyncio.to_thread(server.stop)


def _md5(path: Path) -> str:
    h = hashlib.md5()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
