"""Coordinator half: serves the CE's BOINC project and turns tasks into workunits and replicas.

Pull model, as BOINC is: a task is claimed (`ce.task_started`) when its first
replica goes out in a scheduler reply. Clients are kicked over the CE bus
(their worker half does a GUI-RPC `project update`) whenever work appears,
so nothing waits for a poll. Every reported result is acknowledged; a task's
result reaches `ce.accept_results` only once a quorum of replicas agreed.

After a failover the successor starts from the journal (settled tasks stay
settled) and from what the clients tell it: every request lists the replicas
the client holds (`<other_results>`) and reports finished ones, so replicas a
previous coordinator handed out are adopted, not sent again; a replica we sent
that a client no longer lists is lost and replaced.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import logging
import os
import re
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
    SchedulerRequest,
    WorkItem,
    build_reply,
    master_page,
    output_file_name,
    parse_request,
    task_of,
)
from .quorum import SENT, TaskReplicas, may_take_a_replica, nodes_short, parse_options
from .results import unpack
from .upload import UploadStore
from .wrapper import input_open_name, task_mac, task_script

log = logging.getLogger("bonjourgrid.boinc")

NEXT_RPC_S = 60.0  # a safety net only: work and requeues are announced by kicks
MAX_OUTPUT_BYTES = 1 << 30
PREFETCH_PER_SLOT = 1  # replicas a client holds beyond its running ones
RPC_TIMEOUT_S = 60.0
TASK_FILE = re.compile(r"t(\d{1,9})\.(sh|mac)")


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
        if ce.resume:
            await self._restore()
        self.uploads = UploadStore(self.root / "upload", self._upload_cap)
        port = identity.project_port(ce.key, ce.ce)
        self.server = self._serve(port)
        self.url = identity.project_url(ce.address, self.server.port, ce.ce)
        self.server.start()
        log.info("CE %s: BOINC project at %s (replication %d, quorum %d)", ce.ce, self.url, self.replication,
                 self.quorum)
        return {"url": self.url}

    async def _restore(self) -> None:
        """A takeover: tasks the journal holds as done or failed are settled; the others wait for the
        clients to say which replicas they hold (adopted) or for the core to requeue them."""
        assert self.ce.journal is not None
        rows = await asyncio.to_thread(self.ce.journal.tasks, self.ce.job_id)
        for row in rows:
            if row.state in ("done", "failed") and row.index in self.tasks:
                self.tasks[row.index].settled = True
                self.open.pop(row.index, None)
        log.info("CE %s: BOINC project resumed at epoch %d: %d task(s) still open", self.ce.ce, self.ce.epoch,
                 len(self.open))

    def _serve(self, port: int) -> ProjectServer:
        kw = dict(master=self._master, scheduler=self._scheduler, upload=self._upload, download=self._download)
        try:
            return ProjectServer(self.ce.address, port, self.ce.ce, **kw)  # type: ignore[arg-type]
        except OSError:  # the derived port is taken: any port will do, workers get the URL from the CE
            return ProjectServer(self.ce.address, 0, self.ce.ce, **kw)  # type: ignore[arg-type]

    def _new_task(self, index: int) -> None:
        old = self.tasks.get(index)
        t = TaskReplicas(index, self.replication, self.quorum, seq=old.seq if old else 0,  # names never reused
                         epoch=self.ce.epoch)
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

    def _task_files(self, index: int, base: str) -> list[InputRef]:
        """The workunit's command script and its HMAC (the same bytes whichever coordinator writes them)."""
        refs = []
        for (name, open_name), data in zip(((f"t{index}.sh", TASK_OPEN_NAME), (f"t{index}.mac", MAC_OPEN_NAME)),
                                           self._write_task_files(index), strict=True):
            refs.append(InputRef(name, f"{base}download/{name}", len(data), hashlib.md5(data).hexdigest(), open_name))
        return refs

    def _write_task_files(self, index: int) -> tuple[bytes, bytes]:
        spec = self.ce.job.tasks[index]
        script = task_script(spec.argv, spec.env, self.ce.inputs, self.ce.job.timeout_s).encode()
        mac = task_mac(self.mac_key, script).encode()
        for name, data in ((f"t{index}.sh", script), (f"t{index}.mac", mac)):
            path = self.downloads / name
            if not path.exists():  # HTTP threads may race here: each writes whole files, renamed into place
                tmp = path.with_name(f".{name}.{os.getpid()}.{id(data)}")
                tmp.write_bytes(data)
                os.replace(tmp, path)
        return script, mac

    # ------------------------------------------------------------- HTTP side --

    def _master(self, host: str | None) -> bytes:
        base = identity.url_for_host(host, self.ce.ce, self.url)
        return master_page(f"BonjourGrid {self.ce.job.name}", base + "cgi").encode()

    def _download(self, name: str) -> Path | None:
        """Inputs, and any task's files: a client may fetch those of a workunit our predecessor sent."""
        m = TASK_FILE.fullmatch(name)
        if m and int(m.group(1)) < len(self.ce.job.tasks):
            self._write_task_files(int(m.group(1)))
        return self.downloads / name

    def _upload_cap(self, name: str) -> int | None:
        """Outputs of replicas we issued, and of replicas of open tasks a predecessor issued (to be adopted)."""
        if not name.endswith("_out"):
            return None
        result = name.removesuffix("_out")
        index = task_of(result)
        known = result in self.by_name or (index is not None and index in self.open)
        return MAX_OUTPUT_BYTES if known else None

    def _upload(self, body: bytes) -> bytes:
        return self.uploads.handle(body)

    def _scheduler(self, ip: str, host: str | None, body: bytes) -> bytes:
        """Runs in an HTTP thread: the decisions are made on the CE's event loop."""
        fut = asyncio.run_coroutine_threadsafe(self._rpc(ip, host, body), self.loop)
        return fut.result(RPC_TIMEOUT_S)

    async def _rpc(self, ip: str, host: str | None, body: bytes) -> bytes:
        req = parse_request(body)
        name = f"BonjourGrid {self.ce.job.name}"
        base = identity.url_for_host(host, self.ce.ce, self.url)
        upload_url = base + "file_upload_handler"
        if not hmac.compare_digest(req.authenticator.encode(), self.auth.encode()):
            log.warning("CE %s: BOINC request from %s with a wrong authenticator", self.ce.ce, ip)
            return build_reply(project_name=name, master_url=base, upload_url=upload_url, hostid=None,
                               work=[], acks=[], request_delay=3600, message="wrong authenticator")
        node = self._node(ip)
        member = node is not None and node in self.ce.dispatch.workers
        if member:
            assert node is not None
            await self._take_stock(node, req)
        for r in req.reported:
            await self._reported(node, r)
        work: list[WorkItem] = []
        if member and req.wants_work and self.ce.state == "running":
            assert node is not None
            slots = self.slots.get(node, 1)
            held = sum(1 for t in self.open.values() for r in t.inflight() if r.node == node)
            work = await self._pick(node, slots * (1 + PREFETCH_PER_SLOT) - held, base)
        hostid = None if req.hostid else identity.host_id(node or ip)
        if req.reported or work:
            log.debug("CE %s: BOINC rpc from %s: %d reported, %d sent", self.ce.ce, ip, len(req.reported), len(work))
        return build_reply(project_name=name, master_url=base, upload_url=upload_url, hostid=hostid,
                           work=work, acks=[r.name for r in req.reported], next_rpc_delay=NEXT_RPC_S)

    async def _take_stock(self, node: str, req: SchedulerRequest) -> None:
        """What the client holds: adopt replicas a predecessor handed out, and lose ours it dropped."""
        held = [*req.in_progress, *(r.name for r in req.reported)]
        for name in held:
            index = task_of(name)
            if name not in self.by_name and index is not None and index in self.tasks:
                await self._adopt(node, name, index)
        names = set(held)
        for t in list(self.open.values()):
            gone = t.dropped_by(node, names)
            for rep in gone:
                log.warning("CE %s: client of %s no longer has replica %s: sending another", self.ce.ce, node[:8],
                            rep.name)
                self._unhold(node, t.index)
            if gone:
                await self._settle(t)

    async def _adopt(self, node: str, name: str, index: int) -> None:
        """A replica a previous coordinator sent to this client: ours now, so the task is not sent again."""
        self.by_name[name] = index
        if self.tasks[index].adopt(name, node) is None:
            return
        if self.attempts[index] is None:
            self.attempts[index] = await self._attempt(index, node)
        self._hold(node, index)
        log.info("CE %s: adopted replica %s of task %d on %s (sent before a failover)", self.ce.ce, name, index,
                 node[:8])

    async def _attempt(self, index: int, node: str) -> int | None:
        """The journal's attempt of a task a replica of which came from `node`: a pending task is started
        there; None if the journal says the task is over."""
        assert self.ce.journal is not None
        row = await asyncio.to_thread(self.ce.journal.task, self.ce.job_id, index)
        if row.state == "pending":
            return await self.ce.task_started(index, node)
        if row.state == "running":
            if index not in self.ce.dispatch.running:
                self.ce.dispatch.claim(index, node)
            return row.attempts
        return None

    def _node(self, ip: str) -> str | None:
        if ip in self.ce.daemon.config.addresses:
            return self.ce.daemon.node_id  # our own client (a successor keeps working for its CE)
        node = self.node_of_ip.get(ip)
        if node is None:
            for node_id, rec in self.ce.daemon.view.nodes.items():
                if ip in rec.addresses:
                    self.node_of_ip[ip] = node = node_id
                    break
        return node

    # ------------------------------------------------------------ scheduling --

    async def _pick(self, node: str, room: int, base: str) -> list[WorkItem]:
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
            inputs = [InputRef(f.name, f"{base}download/{f.name}", f.nbytes, f.md5, f.open_name) for f in self.inputs]
            files = await asyncio.to_thread(self._task_files, index, base)
            out.append(WorkItem(wu_name=f"t{index}", result_name=rep.name, inputs=files + inputs,
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
        path = self.uploads.path(output_file_name(r.name))
        if t is None or t.settled or r.name not in t.replicas or t.replicas[r.name].state != SENT:
            with contextlib.suppress(OSError):
                path.unlink()  # a replica of a settled task, or reported twice: acknowledged, nothing else
            if t is not None and index is not None and t.settled and node is not None:
                self._unhold(node, index)
            return
        outcome = None
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
            attempt = self.attempts[index] = await self._attempt(index, best.node)
        if attempt is None:  # the journal already holds its outcome
            log.info("CE %s: task %d was already settled: result %s dropped", self.ce.ce, index, best.name)
            return
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

    def wants(self, node_id: str) -> bool:
        return may_take_a_replica(self.open.values(), node_id)

    def workers_needed(self) -> int:
        return nodes_short(self.open.values(), self.ce.dispatch.workers)

    async def worker_joined(self, node_id: str, slots: int) -> None:
        self.slots[node_id] = slots
        # Where its relay sends the client's requests; after a failover, requests held there go now.
        await self.ce.send(node_id, "project", {"url": self.url})
        if self.ce.resume or any(t.wanted() for t in self.open.values()):
            await self.ce.send(node_id, "kick", {})  # after a failover: report what it holds, right away

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
