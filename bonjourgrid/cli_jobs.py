"""Job commands: submit, jobs, status, results, cancel."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import signal
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from .cli import (
    GridOpt,
    KeyFileOpt,
    OwnerSpec,
    StateDirOpt,
    app,
    check_grid,
    err,
    fail,
    load_key,
    node_config,
    out,
)
from .jobspec import JobFileError, JobSpec, load_job, sweep_job
from .localnode import FINAL_STATES, LocalNode, NodeUnavailable, RequestFailed, find_job, wait_for_node
from .paths import default_state_dir
from .sandbox import safe_join
from .summary import summary_text


def _node(key_file: Path | None, grid: str, state_dir: Path | None) -> LocalNode:
    check_grid(grid)
    node = LocalNode.find(state_dir or default_state_dir(), load_key(key_file), grid)
    if node is None:
        raise fail("no node daemon runs here for this grid (start one with `bonjourgrid node`, "
                   "or pass the --state-dir it uses)")
    return node


def _ask(node: LocalNode, kind: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    try:
        return asyncio.run(node.ask(kind, body))
    except RequestFailed as e:
        raise fail(str(e), 1) from None
    except NodeUnavailable as e:
        raise fail(str(e), 1) from None


@app.command()
def submit(
    args: Annotated[list[str] | None, typer.Argument(help="JOB.toml, or with --tasks: the command, after --")] = None,
    tasks: Annotated[int | None, typer.Option(help="Short form: run the command N times, {i} = task index.",
                                              min=1)] = None,
    backend: Annotated[str | None, typer.Option(help="Backend (default: the job file's, or native).")] = None,
    name: Annotated[str | None, typer.Option(help="Short form: the job's name.")] = None,
    input_: Annotated[list[str] | None, typer.Option("--input", help="Short form: input file (repeatable).")] = None,
    output: Annotated[list[str] | None, typer.Option(help="Short form: output file or glob (repeatable).")] = None,
    require: Annotated[list[str] | None, typer.Option(help="Short form: required capability (repeatable).")] = None,
    memory: Annotated[str | None, typer.Option(help="Short form: memory per task, e.g. 256M.")] = None,
    disk: Annotated[str | None, typer.Option(help="Short form: the most a task may keep in its directory, "
                                                  "e.g. 2G (a task over it is stopped and fails).")] = None,
    retries: Annotated[int | None, typer.Option(help="Short form: retries of a failed task.", min=0)] = None,
    timeout: Annotated[str | None, typer.Option(help="Short form: time limit per task, e.g. 90s, 10m.")] = None,
    results: Annotated[Path | None, typer.Option(help="Where results land (default: ./results/<job>/).")] = None,
    detach: Annotated[bool, typer.Option("--detach/--wait", help="Return at once, or wait for the results.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON summary at the end.")] = False,
    broker: Annotated[str | None, typer.Option(help="External MQTT broker mqtt://HOST:PORT for this CE.")] = None,
    key_file: KeyFileOpt = None,
    grid: GridOpt = "default",
    state_dir: StateDirOpt = None,
) -> None:
    """Submit a job: this node becomes a coordinator, recruits idle desktops, runs it, returns the results.

    Examples: `bonjourgrid submit job.toml`;
    `bonjourgrid submit --tasks 100 -- python3 sim.py --seed {i}`.
    """
    check_grid(grid)
    key = load_key(key_file)
    short = {"name": name, "inputs": input_, "outputs": output, "requires": require, "memory": memory,
             "disk": disk, "retries": retries, "timeout": timeout}
    spec = _job_from_args(args or [], tasks, backend, short)
    sd = state_dir or default_state_dir()
    node = LocalNode.find(sd, key, grid)
    if node is None and detach:
        raise fail("--detach needs a node daemon running here (`bonjourgrid node`); without one, "
                   "submit runs a temporary node and must wait")
    config = None
    if node is None:
        err.print("[dim]no node daemon runs here: starting a temporary one for this job[/]")
        config = node_config(key_file, grid, sd, None, None, None, None, 0, None, OwnerSpec(cpu=100.0))
        config.run_queue = False  # the jobs queued here wait for the node daemon
    code = asyncio.run(_submit(spec, node, config, results, detach, as_json, broker, key, grid, sd))
    raise typer.Exit(code)


def _job_from_args(args: list[str], tasks: int | None, backend: str | None, short: dict[str, Any]) -> JobSpec:
    try:
        if tasks is not None:
            if not args:
                raise fail("--tasks needs a command after --, e.g. --tasks 10 -- echo {i}")
            return sweep_job(args, tasks, backend=backend or "native", base_dir=Path.cwd(), **short)
        if len(args) != 1:
            raise fail("give one job file, or --tasks N -- COMMAND ...")
        given = [k for k, v in short.items() if v]
        if given:
            raise fail(f"--{given[0]} is for the short form (--tasks); in a job file, set it in the file")
        spec = load_job(Path(args[0]))
    except JobFileError as e:
        raise fail(str(e)) from None
    if backend:
        d = spec.to_dict()
        d["backend"] = backend
        spec = JobSpec.from_dict(d)
    return spec


async def _submit(spec: JobSpec, node: LocalNode | None, config: Any, results: Path | None, detach: bool,
                  as_json: bool, broker: str | None, key: Any, grid: str, state_dir: Path) -> int:
    temp = None
    if node is None:
        from .node import NodeDaemon

        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
        logging.getLogger("zeroconf").setLevel(logging.ERROR)
        daemon = NodeDaemon(config)
        temp = asyncio.ensure_future(daemon.run(handle_signals=False))
        node = await wait_for_node(state_dir, key, grid)
        await asyncio.sleep(1.0)  # let the temporary node hear the grid's announcements
    try:
        try:
            reply = await node.ask("submit", {"job": spec.to_dict(), "broker": broker}, timeout=60)
        except (RequestFailed, NodeUnavailable) as e:
            err.print(f"[bold red]error:[/] {e}")
            return 1
        job, ahead = str(reply["job"]), reply.get("queued")
        queued = f"queued: {ahead} job{'s' if ahead != 1 else ''} to go before it" if ahead is not None else ""
        if detach:
            if as_json:
                print(json.dumps({"job": job, "state": "queued" if queued else "submitted",
                                  "tasks_total": len(spec.tasks)}))
            else:
                out.print(f"submitted [bold]{job}[/]{f' ({queued})' if queued else ''}; "
                          f"follow it with `bonjourgrid status {job}`")
            return 0
        if queued:  # on stderr: with --json too
            err.print(f"[dim]{job} is {queued} on this node; it starts when the job running here ends[/]",
                      soft_wrap=True)
        dest = (results or Path("results") / job).resolve()
        stream = _Stream(node, job, dest)
        try:
            status, holder = await _follow(node, job, len(spec.tasks), as_json, stream)
        except NodeUnavailable as e:  # nobody to follow: the job is not lost, its node may come back
            err.print(f"[bold red]error:[/] {e}; `bonjourgrid status {job}` and `bonjourgrid results {job}` "
                      "find it once a node that holds it answers")
            return 1
        if status["state"] != "cancelled" or status["tasks_done"]:
            try:
                if holder is node:  # our own node: it writes the files straight into dest, the rest of them
                    status = await node.ask("export", {"job": job, "dest": str(dest), "after": stream.mark},
                                            timeout=600)
                else:
                    status = await fetch_results(holder, job, dest)
            except (RequestFailed, NodeUnavailable) as e:
                _report(status, as_json)
                err.print(f"[bold red]error:[/] {e}")
                return 1
        _report(status, as_json)
        return 0 if status["state"] == "done" else 1
    finally:
        if temp is not None:
            daemon.request_stop()
            await temp


POLL_S = 0.25  # progress updates; the node answers sooner when the job ends


class _Lost(Exception):
    pass


class _Stream:
    """Results written into the results directory while the job runs, by the node that coordinates it.

    At the end only the tasks done since the last round are left to write: on a big sweep, writing
    thousands of files after the last task was most of the wait (docs/architecture.md §6).
    """

    def __init__(self, node: LocalNode, job: str, dest: Path) -> None:
        self.node, self.job, self.dest = node, job, dest
        self.mark = 0  # see jobs._export: meaningful only for `node`'s journal
        self.on = True

    async def step(self, via: LocalNode) -> None:
        if not self.on or via is not self.node:
            return
        try:
            reply = await self.node.ask("export", {"job": self.job, "dest": str(self.dest), "after": self.mark,
                                                   "partial": True}, timeout=60)
            self.mark = int(reply["mark"])
        except (NodeUnavailable, RequestFailed, KeyError, TypeError, ValueError):
            self.on = False  # the results are written at the end; an error is reported then


async def _follow(node: LocalNode, job: str, total: int, quiet: bool,
                  stream: _Stream | None = None) -> tuple[dict[str, Any], LocalNode]:
    """Progress until the job ends; Ctrl-C asks: cancel the job, or detach and leave it running.

    If the coordinator stops answering, or says the CE moved, follow the CE to the node that
    coordinates it now (found over mDNS). Returns the final status and the node that has it.
    """
    interrupted = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGINT, interrupted.set)
    try:
        with _progress(quiet) as bar:
            t = bar.add_task(job, total=total, info="starting")
            while True:
                asked = loop.time()
                try:
                    status = await node.ask("job", {"job": job, "wait": POLL_S}, timeout=3 + POLL_S)
                    if status["state"] == "moved":
                        raise _Lost(status.get("message", "moved"))
                except (NodeUnavailable, RequestFailed, _Lost) as e:
                    bar.update(t, info=f"coordinator lost ({str(e)[:40]}): looking for its successor")
                    node = await _successor(node, job)
                    continue
                finished = status["tasks_done"] + status["tasks_failed"]
                bar.update(t, completed=finished, info=status.get("message") or (
                    f"{status['tasks_running']} running, {status['tasks_failed']} failed, "
                    f"{status['workers']} workers, {status['tasks_per_second']:.1f} tasks/s"))
                if status["state"] in FINAL_STATES:
                    return status, node
                if stream is not None and status["state"] != "queued":
                    await stream.step(node)
                if interrupted.is_set():
                    interrupted.clear()
                    if await _ask_cancel(bar):
                        await node.ask("cancel", {"job": job})
                    else:
                        bar.stop()
                        err.print(f"detached: {job} keeps running; `bonjourgrid status {job}`, "
                                  f"`bonjourgrid results {job}`")
                        raise SystemExit(0)
                with contextlib.suppress(asyncio.TimeoutError):  # a node that did not wait (an older one)
                    await asyncio.wait_for(interrupted.wait(), max(POLL_S - (loop.time() - asked), 0))
    finally:
        loop.remove_signal_handler(signal.SIGINT)


SUCCESSOR_WAIT_S = 120.0


async def _successor(old: LocalNode, job: str) -> LocalNode:
    """The node that coordinates `job` now: another one, this one's restarted daemon, or the same
    daemon once it answers again (a desktop that stalled for a few seconds, under swap, say)."""
    deadline = asyncio.get_running_loop().time() + SUCCESSOR_WAIT_S
    while asyncio.get_running_loop().time() < deadline:
        with contextlib.suppress(NodeUnavailable, RequestFailed):
            if (await old.ask("job", {"job": job}, timeout=1.0))["state"] != "moved":
                return old
        found = await find_job(old.key, old.grid, job)
        # Another node, or this one's daemon restarted (a new port): a job queued here starts then.
        if found is not None and (found.node_id, found.port) != (old.node_id, old.port):
            err.print(f"following {job} to its new coordinator {found.node_id[:8]} at {found.host}")
            return found
        await asyncio.sleep(0.5)
    raise NodeUnavailable(f"{job}: its coordinator is gone and no successor appeared within {SUCCESSOR_WAIT_S:g}s")


FETCH_CONCURRENCY = 8  # a big sweep has thousands of small files: one request each, several at a time


async def fetch_results(node: LocalNode, job: str, dest: Path) -> dict[str, Any]:
    """Copy a job's results from a (remote) node into dest, file by file in chunks."""
    listing = await node.ask("result_list", {"job": job}, timeout=600)
    gate = asyncio.Semaphore(FETCH_CONCURRENCY)

    async def fetch(rel: str) -> None:
        try:
            target = safe_join(dest, rel)  # the listing comes from another node: stay inside dest
        except ValueError as e:
            raise RequestFailed(f"refusing a result path from {node.host}: {e}") from None
        target.parent.mkdir(parents=True, exist_ok=True)
        async with gate:
            with open(target, "wb") as f:
                offset, eof = 0, False
                while not eof:
                    part = await node.ask("result_file", {"job": job, "path": rel, "offset": offset}, timeout=60)
                    data = base64.b64decode(part["data"])
                    f.write(data)
                    offset, eof = offset + len(data), bool(part["eof"])

    try:
        await asyncio.gather(*(fetch(rel) for rel, _size in listing["files"]))
        summary = json.loads((dest / "summary.json").read_text())
        summary["results_dir"] = str(dest)
        (dest / "summary.json").write_text(summary_text(summary))
    except OSError as e:  # a full disk here, say: the node still has them
        raise RequestFailed(f"cannot write the results into {dest}: {e}") from None
    return {**listing["status"], "results_dir": str(dest)}


def _progress(quiet: bool) -> Any:
    """The job's progress bar on stderr; with `quiet`, nothing (and rich is not even imported)."""
    if quiet:
        return _NoProgress()
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[info]}"), TimeElapsedColumn(), console=err.rich, transient=False)


class _NoProgress:
    def __enter__(self) -> _NoProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def add_task(self, *args: Any, **kwargs: Any) -> int:
        return 0

    def update(self, *args: Any, **kwargs: Any) -> None:
        pass

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass


async def _ask_cancel(bar: Any) -> bool:
    if not sys.stdin.isatty():
        return True
    bar.stop()
    answer = await asyncio.to_thread(input, "\nCancel the job [c], or detach and leave it running [d]? ")
    bar.start()
    return not answer.strip().lower().startswith("d")


def _report(status: dict[str, Any], as_json: bool) -> None:
    summary = {k: status.get(k) for k in ("job", "state", "tasks_total", "tasks_done", "tasks_failed",
                                          "results_dir", "workers_used", "seconds", "message")}
    if as_json:
        print(json.dumps(summary))
        return
    colour = {"done": "green", "failed": "red", "cancelled": "yellow"}.get(status["state"], "white")
    out.print(f"[bold {colour}]{status['job']}: {status['state']}[/] — {status['tasks_done']} done, "
              f"{status['tasks_failed']} failed of {status['tasks_total']} on {status['workers_used']} worker(s) "
              f"in {status['seconds']:.1f}s")
    if status.get("message"):
        out.print(status["message"])
    if status.get("results_dir"):
        out.print(f"results in {status['results_dir']}")


@app.command()
def jobs(key_file: KeyFileOpt = None, grid: GridOpt = "default", state_dir: StateDirOpt = None,
         as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """List the jobs this node coordinates, coordinated, holds queued or holds a copy of, oldest first."""
    listed = _ask(_node(key_file, grid, state_dir), "jobs")["jobs"]
    if as_json:
        print(json.dumps(listed, indent=2))
        return
    from rich.table import Table

    table = Table(title=f"{len(listed)} job(s)", title_justify="left")
    # The id in full, folded if need be: `status`, `results` and `cancel` take it.
    table.add_column("job", overflow="fold", ratio=1)
    table.add_column("submitted", no_wrap=True)
    table.add_column("state", no_wrap=True)
    for col in ("done", "failed", "workers", "seconds"):
        table.add_column(col, justify="right", no_wrap=True)
    today = time.strftime("%Y-%m-%d")
    copies = 0  # unfinished copies of a journal: the job may have gone on without them
    for j in listed:
        copy = bool(j.get("replica")) and j["state"] not in FINAL_STATES
        copies += copy
        at = j.get("submitted_at")
        when = time.localtime(at) if at else None
        submitted = "" if when is None else time.strftime(
            "%H:%M:%S" if time.strftime("%Y-%m-%d", when) == today else "%m-%d %H:%M", when)
        table.add_row(j["job"], submitted, f"{j['state']} (copy)" if copy else j["state"],
                      f"{j['tasks_done']}/{j['tasks_total']}", str(j["tasks_failed"]), str(j["workers_used"]),
                      f"{j['seconds']:.1f}")
    out.print(table)
    if copies:
        out.print("(copy): this node's copy of a job's journal, which the job may have gone on without; "
                  "`bonjourgrid status JOB` asks the node that holds the job")


@app.command()
def status(job: str, key_file: KeyFileOpt = None, grid: GridOpt = "default", state_dir: StateDirOpt = None,
           as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Show one job's progress."""
    try:
        s = asyncio.run(_status(_node(key_file, grid, state_dir), job))
    except NodeUnavailable as e:
        raise fail(str(e), 1) from None
    if as_json:
        print(json.dumps(s, indent=2))
        return
    out.print(f"[bold]{s['job']}[/] {s['state']}: {s['tasks_done']} done, {s['tasks_failed']} failed, "
              f"{s['tasks_running']} running, {s['tasks_pending']} pending of {s['tasks_total']}; "
              f"{s['workers']} worker(s) now, {s['workers_used']} used; {s['seconds']:.1f}s")
    if s.get("message"):
        out.print(s["message"])


@app.command()
def results(job: str, dest: Annotated[Path | None, typer.Option(help="Default: ./results/<job>/")] = None,
            key_file: KeyFileOpt = None, grid: GridOpt = "default", state_dir: StateDirOpt = None) -> None:
    """Write a job's results (per task stdout, stderr, outputs; summary.json) to a directory."""
    target = (dest or Path("results") / job).resolve()
    local = _node(key_file, grid, state_dir)
    try:
        s = asyncio.run(_results(local, job, target))
    except NodeUnavailable as e:
        raise fail(str(e), 1) from None
    out.print(f"{s['job']} ({s['state']}): results in {s['results_dir']}")


async def _holder(local: LocalNode, job: str) -> tuple[dict[str, Any] | None, LocalNode | None]:
    """(this node's status of `job`, the node to ask about it): `local` itself if it coordinates the
    job or knows its end. A copy the job may have gone on without (this node stepped down, left the
    CE, or holds an unfinished journal from before a restart) is the last resort: the node that
    holds the job now, found over mDNS, comes first (None if none answers)."""
    try:
        mine: dict[str, Any] | None = await local.ask("job", {"job": job})
    except RequestFailed as e:
        if "no job" not in str(e):
            raise fail(str(e), 1) from None
        mine = None
    if mine is not None and (mine["state"] in FINAL_STATES or (not mine.get("replica") and mine["state"] != "moved")):
        return mine, local
    return mine, await find_job(local.key, local.grid, job)


def _nobody_knows(job: str) -> str:
    return f"no node of the grid knows job {job!r} (see `bonjourgrid jobs` on its submitting node)"


async def _status(local: LocalNode, job: str) -> dict[str, Any]:
    mine, holder = await _holder(local, job)
    if holder is local:
        assert mine is not None
        return mine
    if holder is not None:
        with contextlib.suppress(RequestFailed, NodeUnavailable):
            return await holder.ask("job", {"job": job})
    if mine is None:
        raise fail(_nobody_knows(job), 1)
    return mine  # its message says what kind of copy it is


async def _results(local: LocalNode, job: str, dest: Path) -> dict[str, Any]:
    """This node writes them if it knows the job's state (`_holder`); else the node that does."""
    mine, holder = await _holder(local, job)
    if holder is local:
        return await _export_here(local, job, dest)
    problem = _nobody_knows(job)
    if holder is not None:
        try:
            return await fetch_results(holder, job, dest)
        except (RequestFailed, NodeUnavailable) as e:
            problem = f"cannot fetch the results of {job}: {e}"
    if mine is None:
        raise fail(problem, 1)
    err.print(f"[yellow]warning:[/] {problem}; writing this node's copy instead ({mine['state']}: "
              f"{mine.get('message') or 'it may be behind the job'})")
    return await _export_here(local, job, dest)


async def _export_here(local: LocalNode, job: str, dest: Path) -> dict[str, Any]:
    try:
        return await local.ask("export", {"job": job, "dest": str(dest)})
    except RequestFailed as e:
        raise fail(str(e), 1) from None


@app.command()
def cancel(job: str, key_file: KeyFileOpt = None, grid: GridOpt = "default", state_dir: StateDirOpt = None) -> None:
    """Cancel a running job (its tasks stop, its workers are released) or a queued one (it never starts)."""
    s = _ask(_node(key_file, grid, state_dir), "cancel", {"job": job})
    out.print(f"{s['job']}: {s['state']}")
