"""Worker half: runs Debian's unmodified `boinc` client, unprivileged, attached to the CE's project.

Private data dir (under /tmp: the node's state dir is not reachable by an
unprivileged user), its own GUI-RPC port and password, the wrapper app
installed under the anonymous platform before attaching. The client is
attached to a loopback relay (`relay.py`), not to the coordinator, so a
failover changes nothing for it: the coordinator's `project` message points
the relay at its own project. Its `kick` messages become GUI-RPC
`project update` requests. If the client dies, the half ends, so the CE
loses this worker and requeues its tasks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pwd
import secrets
import shutil
import socket
import tempfile
from pathlib import Path

from bonjourgrid.backend import BackendError, WorkerHalf
from bonjourgrid.envelope import Envelope
from bonjourgrid.worker import WorkerCE

from . import identity
from .guirpc import GuiRpc
from .handover import post_output, to_hand_over
from .protocol import task_of
from .relay import Relay, parse_upstream
from .wrapper import WRAPPER_NAME, app_info_xml, wrapper_script

log = logging.getLogger("bonjourgrid.boinc.worker")

BOINC = "boinc"
XFERS = 8  # concurrent file transfers per project (the client's default, 2, fetches a reply's tasks one by one)
CLIENT_LOG_LINES = 300  # of the client's log, written to ours at debug level when it stops
RUN_AS = "boinc"  # the user Debian's package creates; used when the node runs as root
PREFS = ("<global_preferences>\n<run_on_batteries>1</run_on_batteries><run_if_user_active>1</run_if_user_active>"
         "<run_gpu_if_user_active>1</run_gpu_if_user_active><suspend_cpu_usage>0</suspend_cpu_usage>"
         "<max_ncpus_pct>100</max_ncpus_pct><cpu_usage_limit>100</cpu_usage_limit>"
         "<work_buf_min_days>0.0001</work_buf_min_days><work_buf_additional_days>0</work_buf_additional_days>"
         "<disk_min_free_gb>0.1</disk_min_free_gb><disk_max_used_pct>100</disk_max_used_pct>"
         "<cpu_scheduling_period_minutes>600</cpu_scheduling_period_minutes>"
         "\n</global_preferences>\n")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class BoincWorker(WorkerHalf):
    worker: WorkerCE

    def __init__(self, worker: WorkerCE) -> None:
        super().__init__(worker)
        self.rpc: GuiRpc | None = None
        self.relay: Relay | None = None
        self.url = ""  # what the client is attached to: the relay's loopback URL, the same for the CE's life
        self.proc: asyncio.subprocess.Process | None = None
        self.data: Path | None = None
        self._kicks = asyncio.Event()
        self._handover: asyncio.Task[None] | None = None
        self._project_url: str | None = None

    async def run(self) -> None:
        cfg = self.worker.config.get("backend_config") or {}
        if not shutil.which(BOINC):
            raise BackendError("the boinc client is not installed (apt-get install boinc-client)")
        ce = self.worker.ce
        try:
            self.relay = Relay(identity.project_port(self.worker.key, ce), self._project_url or str(cfg.get("url")))
        except ValueError as e:
            raise BackendError(f"bad BOINC project URL from the coordinator: {e}") from e
        auth = identity.authenticator(self.worker.key, ce)
        port, password = free_port(), secrets.token_hex(16)
        kicker = None
        try:
            self.url = identity.project_url("127.0.0.1", await self.relay.start(), ce)
            mine = f"bg-boinc-{self.worker.node_id[:8]}-"
            for stale in Path(tempfile.gettempdir()).glob(mine + "*"):  # a node is in one CE at a time: a
                shutil.rmtree(stale, ignore_errors=True)  # dir of ours is what a killed daemon left behind
            self.data = Path(tempfile.mkdtemp(prefix=f"{mine}{ce[:12]}-"))
            await asyncio.to_thread(self._prepare, password)
            self.proc = await asyncio.create_subprocess_exec(
                *self._as_user(), BOINC, "--dir", str(self.data), "--gui_rpc_port", str(port),
                "--allow_multiple_clients", "--no_gpus", "--skip_cpu_benchmarks", "--no_info_fetch",
                "--redirectio", "--attach_project", self.url, auth,
                cwd=self.data, stdin=asyncio.subprocess.DEVNULL, start_new_session=True)
            log.info("CE %s: boinc client %d started in %s, GUI-RPC port %d", self.worker.ce, self.proc.pid,
                     self.data, port)
            self.rpc = GuiRpc("127.0.0.1", port, password)
            await self._connect()
            await self.rpc.run_mode_always()
            kicker = asyncio.ensure_future(self._kick_loop())
            code = await self.proc.wait()
            raise BackendError(f"the boinc client exited with status {code}")
        finally:
            if kicker is not None:
                kicker.cancel()
            await self._shutdown()

    def _as_user(self) -> list[str]:
        if os.geteuid() != 0:
            return []
        try:
            pwd.getpwnam(RUN_AS)
        except KeyError:
            return ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "--"]
        return ["setpriv", f"--reuid={RUN_AS}", f"--regid={RUN_AS}", "--clear-groups", "--"]

    def _prepare(self, password: str) -> None:
        """Data dir before the first start: password, preferences, CPU count, the app (anonymous platform)."""
        assert self.data is not None
        d = self.data
        (d / "gui_rpc_auth.cfg").write_text(password)
        (d / "global_prefs_override.xml").write_text(PREFS)
        (d / "cc_config.xml").write_text(f"<cc_config><options><ncpus>{self.worker.slots}</ncpus>"
                                         "<allow_multiple_clients>1</allow_multiple_clients>"
                                         f"<max_file_xfers>{2 * XFERS}</max_file_xfers>"
                                         f"<max_file_xfers_per_project>{XFERS}</max_file_xfers_per_project>"
                                         "</options></cc_config>\n")
        proj = d / "projects" / identity.project_dir_name(self.url)
        proj.mkdir(parents=True)
        (proj / "app_info.xml").write_text(app_info_xml())
        wrapper = proj / WRAPPER_NAME
        wrapper.write_text(wrapper_script(identity.workunit_key(self.worker.key, self.worker.ce)))
        wrapper.chmod(0o700)
        if os.geteuid() == 0:
            try:
                u = pwd.getpwnam(RUN_AS)
            except KeyError:
                u = pwd.getpwnam("nobody")
            for root, dirs, files in os.walk(d):
                for name in [root, *(os.path.join(root, x) for x in dirs + files)]:
                    os.chown(name, u.pw_uid, u.pw_gid)
            d.chmod(0o700)

    async def _connect(self) -> None:
        assert self.rpc is not None and self.proc is not None
        for _ in range(100):
            if self.proc.returncode is not None:
                raise BackendError(f"the boinc client exited at start ({self.proc.returncode})")
            try:
                await self.rpc.connect()
                return
            except (TimeoutError, OSError, asyncio.IncompleteReadError):
                await asyncio.sleep(0.1)
        raise BackendError("the boinc client's GUI-RPC never answered")

    async def _kick_loop(self) -> None:
        """Coalesced: a burst of kicks becomes one `project update`."""
        assert self.rpc is not None
        while True:
            await self._kicks.wait()
            self._kicks.clear()
            try:
                await self.rpc.project_op(self.url, "update")
            except Exception as e:
                log.warning("CE %s: GUI-RPC update failed: %s", self.worker.ce, e)
                with contextlib.suppress(Exception):
                    await self.rpc.close()
            await asyncio.sleep(0.2)

    async def on_message(self, env: Envelope) -> None:
        if env.kind == "kick":
            self._kicks.set()
        elif env.kind == "project":
            url = str(env.body.get("url"))
            try:
                target = parse_upstream(url)
            except ValueError as e:
                log.warning("CE %s: ignored a project message: %s", self.worker.ce, e)
                return
            if self.relay is None:
                self._project_url = url  # a new coordinator before our client even started: use its project
                return
            if target == self.relay.upstream:
                return
            if self._handover is not None:
                self._handover.cancel()
            # In the background: the bus must go on (heartbeats, kicks) while outputs are posted.
            self._handover = asyncio.ensure_future(self._switch(url))

    async def _switch(self, url: str) -> None:
        """A new coordinator: hand it the outputs the old one got but never saw reported, then let the
        relay send it the client's requests (the reports come after the files)."""
        assert self.relay is not None
        try:
            if self.rpc is not None and self.data is not None:
                held = await asyncio.wait_for(self.rpc.results(self.url), 5)
                proj = self.data / "projects" / identity.project_dir_name(self.url)
                paths = await asyncio.to_thread(to_hand_over, [(h.name, h.state) for h in held], proj)
                for path in paths:
                    ok = await asyncio.to_thread(post_output, url, path)
                    log.info("CE %s: output %s handed to the new coordinator%s", self.worker.ce, path.name,
                             "" if ok else ": refused")
        except asyncio.CancelledError:
            raise
        except Exception as e:  # those results run again: nothing is lost but time
            log.warning("CE %s: could not hand outputs over to the new coordinator: %s", self.worker.ce, e)
        self.relay.set_upstream(url)

    async def running(self) -> list[int]:
        """Tasks whose results the client holds and the coordinator has not acknowledged: a successor
        leaves them to us (they carry on through the relay)."""
        if self.rpc is None or self.proc is None or self.proc.returncode is not None:
            return []
        try:
            held = await asyncio.wait_for(self.rpc.results(self.url), 5)
        except Exception as e:
            log.warning("CE %s: could not list the client's tasks: %s", self.worker.ce, e)
            return []
        return sorted({i for i in (task_of(h.name) for h in held) if i is not None})

    async def reattached(self) -> None:
        """A new coordinator: it sends its project URL and kicks us once we said hello; nothing to undo."""
        log.info("CE %s: the boinc client keeps its tasks for the new coordinator", self.worker.ce)

    async def _shutdown(self) -> None:
        """Detach and stop the client; remove its data dir."""
        if self.proc is not None and self.proc.returncode is None:
            if self.rpc is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self.rpc.project_op(self.url, "detach"), 3)
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self.rpc.quit(), 3)
            try:
                await asyncio.wait_for(self.proc.wait(), 5)
            except (TimeoutError, asyncio.CancelledError):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, 9)
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self.proc.wait(), 5)
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, 9)  # the wrapper and its task, if the client left them behind
        if self.rpc is not None:
            with contextlib.suppress(Exception):
                await self.rpc.close()
        if self._handover is not None:
            self._handover.cancel()
        if self.relay is not None:
            await self.relay.stop()
        if self.data is not None and log.isEnabledFor(logging.DEBUG):
            with contextlib.suppress(OSError):  # the client's own account of the CE, before it is removed
                tail = (self.data / "stdoutdae.txt").read_text(errors="replace").splitlines()[-CLIENT_LOG_LINES:]
                log.debug("CE %s: boinc client log:\n%s", self.worker.ce, "\n".join(tail))
        if self.data is not None:
            shutil.rmtree(self.data, ignore_errors=True)
