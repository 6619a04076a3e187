"""The `bonjourgrid` command line (typer + rich)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from . import __version__
from .announcement import CAP_RE, GRID_NAME_RE
from .gridkey import GridKey, GridKeyError, key_file_is_private
from .paths import default_key_file, default_state_dir
from .units import format_size, parse_size

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table

    from .gridview import GridView
    from .node import NodeConfig

app = typer.Typer(
    name="bonjourgrid",
    help="A peer-to-peer desktop grid: idle desktops, found over mDNS, run your jobs.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


class _Console:
    """A rich Console, made on first use. Importing rich is about a quarter of a command's start
    (30 ms), and scripts that read `--json` never print with it."""

    def __init__(self, stderr: bool = False) -> None:
        self._stderr = stderr
        self._console: Console | None = None

    @property
    def rich(self) -> Console:
        if self._console is None:
            from rich.console import Console

            self._console = Console(stderr=self._stderr)
        return self._console

    def __getattr__(self, name: str) -> Any:
        return getattr(self.rich, name)


out = _Console()
err = _Console(stderr=True)

# Options every command takes.
KeyFileOpt = Annotated[
    Path | None,
    typer.Option("--key-file", envvar="BONJOURGRID_KEY_FILE", help="Grid key file (default: the one `init` wrote)."),
]
GridOpt = Annotated[
    str, typer.Option("--grid", envvar="BONJOURGRID_GRID", help="Grid name: nodes of other grids are ignored.")
]
StateDirOpt = Annotated[
    Path | None,
    typer.Option("--state-dir", envvar="BONJOURGRID_STATE_DIR",
                 help="Node state directory (default: ~/.local/state/bonjourgrid/node)."),
]
InterfaceOpt = Annotated[
    str | None,
    typer.Option("--interface", "-i", help="Use only this interface (name or IPv4 address) for mDNS."),
]


def fail(message: str, code: int = 2) -> typer.Exit:
    err.print(f"[bold red]error:[/] {message}", soft_wrap=True, highlight=False)
    return typer.Exit(code)


def check_grid(grid: str) -> str:
    if not GRID_NAME_RE.match(grid):
        raise fail(f"bad grid name {grid!r}: 1-32 letters, digits, '.', '_' or '-', starting alphanumeric")
    return grid


def load_key(key_file: Path | None) -> GridKey:
    path = key_file or default_key_file()
    try:
        key = GridKey.read(path)
    except GridKeyError as e:
        raise fail(str(e)) from None
    if not key_file_is_private(path):
        err.print(f"[yellow]warning:[/] {path} is readable by other users; run: chmod 600 {path}")
    return key


def addresses_for(interface: str | None) -> list[str]:
    from .netif import InterfaceError, resolve_interface  # what only node commands need: imported by them

    try:
        return resolve_interface(interface)
    except InterfaceError as e:
        raise fail(str(e)) from None


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("zeroconf").setLevel(logging.WARNING)


@app.callback(invoke_without_command=True)
def _root(
    version: Annotated[bool, typer.Option("--version", help="Print the version and exit.")] = False,
) -> None:
    if version:
        out.print(f"bonjourgrid {__version__}")
        raise typer.Exit()


# ------------------------------------------------------------------ init ----


@app.command()
def init(
    key_file: KeyFileOpt = None,
    grid: GridOpt = "default",
    force: Annotated[bool, typer.Option("--force", help="Replace an existing key.")] = False,
) -> None:
    """Create a new grid key (256 bits, mode 0600). Copy it to every node of the grid."""
    check_grid(grid)
    path = key_file or default_key_file()
    key = GridKey.generate()
    try:
        key.write(path, overwrite=force)
    except GridKeyError as e:
        raise fail(str(e)) from None
    except OSError as e:
        raise fail(f"cannot write {path}: {e.strerror}") from None
    out.print(f"grid key [bold]{key.key_id}[/] written to [bold]{path}[/]")
    out.print(
        "Copy this file to the same place on every desktop of the grid (or point --key-file at it); "
        "anyone holding it can join the grid and submit jobs."
    )


# ------------------------------------------------------------------ node ----


def parse_tags(tags: list[str]) -> dict[str, str]:
    parsed: dict[str, str] = {}
    for t in tags:
        k, sep, v = t.partition("=")
        if not CAP_RE.match(t) or not k:
            raise fail(f"bad tag {t!r}: use KEY or KEY=VALUE with letters, digits and . _ + - (: / in values)")
        parsed[k] = v if sep else ""
    return parsed


@dataclass
class OwnerSpec:
    cpu: float = 25.0
    busy_after: float = 60.0
    free_after: float = 300.0
    disk_reserve: str = "2G"


def node_config(key_file: Path | None, grid: str, state_dir: Path | None, interface: str | None,
                cpus: int | None, memory: str | None, tag: list[str] | None, port: int, name: str | None,
                owner: OwnerSpec, sample_interval: float = 2.0, announce_interval: float = 10.0) -> NodeConfig:
    """A node's configuration from command-line values, with every mistake reported clearly."""
    import psutil

    from .node import NodeConfig, safe_hostname
    from .ownerpolicy import OwnerPolicy
    from .resources import ThrottlePolicy, default_memory_mib, probe_capabilities

    check_grid(grid)
    key = load_key(key_file)
    machine_cpus = psutil.cpu_count() or 1
    if cpus is not None and cpus > machine_cpus:
        raise fail(f"--cpus {cpus}: this machine has {machine_cpus}")
    try:
        memory_mib = parse_size(memory) >> 20 if memory else default_memory_mib()
    except ValueError as e:
        raise fail(f"--memory: {e}") from None
    try:
        disk_reserve = parse_size(owner.disk_reserve)
    except ValueError as e:
        raise fail(f"--disk-reserve: {e}") from None
    try:
        policy = OwnerPolicy(owner.cpu, owner.busy_after, owner.free_after, disk_reserve)
    except ValueError as e:
        raise fail(str(e)) from None
    config = NodeConfig(
        grid=grid,
        key=key,
        state_dir=state_dir or default_state_dir(),
        addresses=addresses_for(interface),
        cpus=cpus or machine_cpus,
        memory_mib=memory_mib,
        caps=probe_capabilities(parse_tags(tag or [])),
        owner=policy,
        throttle=ThrottlePolicy(min_interval=announce_interval),
        sample_interval=sample_interval,
        port=port,
    )
    if name:
        config.host = safe_hostname(name)
    if not config.addresses:
        raise fail("this machine has no IPv4 address to announce on")
    return config


@app.command()
def node(
    key_file: KeyFileOpt = None,
    grid: GridOpt = "default",
    state_dir: StateDirOpt = None,
    interface: InterfaceOpt = None,
    cpus: Annotated[int | None, typer.Option(help="CPUs lent to the grid (default: all).", min=1)] = None,
    memory: Annotated[str | None, typer.Option(help="Memory lent, e.g. 4G (default: half the RAM).")] = None,
    tag: Annotated[list[str] | None, typer.Option("--tag", "-t", help="Capability KEY=VALUE (repeatable).")] = None,
    port: Annotated[int, typer.Option(help="Control port (0: any free port).", min=0, max=65535)] = 0,
    name: Annotated[str | None, typer.Option(help="Name shown in the grid (default: the host name).")] = None,
    owner_cpu: Annotated[
        float, typer.Option(help="Owner policy: leave the grid when non-grid CPU use (%) stays above this. "
                            "100 turns the policy off.", min=0, max=100)
    ] = 25.0,
    owner_busy_after: Annotated[
        float, typer.Option(help="Seconds the owner's use must stay above --owner-cpu before the node withdraws.",
                            min=0)
    ] = 60.0,
    owner_free_after: Annotated[
        float, typer.Option(help="Come back after the owner's use stayed below the threshold this long (s).", min=0)
    ] = 300.0,
    disk_reserve: Annotated[
        str, typer.Option(help="Owner policy: free space kept on the disk of the state directory, e.g. 2G; "
                          "below it the node leaves the grid at once (tasks go elsewhere). 0 turns it off.")
    ] = "2G",
    sample_interval: Annotated[float, typer.Option(help="Seconds between load samples.", min=0.1)] = 2.0,
    announce_interval: Annotated[
        float, typer.Option(help="Minimum seconds between resource re-announcements.", min=0.0)
    ] = 10.0,
    broker: Annotated[
        str | None, typer.Option(help="External MQTT broker for the CEs this node coordinates, mqtt://HOST:PORT "
                                 "(default: one per CE, started by this node; see --ce-broker).")
    ] = None,
    ce_broker: Annotated[
        str, typer.Option(help="The broker each CE of this node starts: auto (Mosquitto if installed, else the "
                          "built-in amqtt), mosquitto or amqtt.")
    ] = "auto",
    failover_timeout: Annotated[
        float, typer.Option(help="Workers of this node's CEs suspect it after this many seconds without a "
                            "heartbeat; replicas then take over in rank order.", min=0.2)
    ] = 1.0,
    lease: Annotated[
        float, typer.Option(help="Workers of this node's CEs go back to Idle after this many seconds without "
                            "any coordinator (no orphans).", min=2.0)
    ] = 30.0,
    keep_copies: Annotated[
        float, typer.Option(help="Days to keep what other nodes' jobs leave in the state directory (journal "
                            "copies held as a replica, exported results, work directories) once untouched; "
                            "0 keeps them forever. Jobs submitted here are never removed.", min=0)
    ] = 7.0,
    task_nice: Annotated[
        int, typer.Option(help="Niceness of the grid's tasks, 0-19: the owner's programs get the CPU first, "
                          "before the owner policy has seen them (BOINC uses 19).", min=0, max=19)
    ] = 10,
    log_level: Annotated[str, typer.Option(help="debug, info, warning or error.")] = "info",
) -> None:
    """Run the node daemon in the foreground: announce this desktop and lend it to the grid."""
    from .broker import CE_BROKERS, mosquitto_problem
    from .mdns import DuplicateNodeId
    from .node import NodeDaemon

    if ce_broker not in CE_BROKERS:
        raise fail(f"--ce-broker must be one of {', '.join(CE_BROKERS)}, not {ce_broker!r}")
    if ce_broker == "mosquitto" and (problem := mosquitto_problem()):
        raise fail(f"--ce-broker mosquitto: {problem}")
    setup_logging(log_level)
    config = node_config(key_file, grid, state_dir, interface, cpus, memory, tag, port, name,
                         OwnerSpec(owner_cpu, owner_busy_after, owner_free_after, disk_reserve), sample_interval,
                         announce_interval)
    config.broker_url, config.ce_broker = broker, ce_broker
    config.failover_timeout_s, config.lease_s = failover_timeout, lease
    config.keep_copies_s, config.task_nice = keep_copies * 86400, task_nice
    try:
        daemon = NodeDaemon(config)
        asyncio.run(daemon.run())
    except DuplicateNodeId as e:
        raise fail(str(e)) from None
    except OSError as e:
        raise fail(f"cannot start the node: {e}") from None


# ----------------------------------------------------------------- nodes ----


def _local_status(state_dir: Path, key: GridKey, grid: str) -> dict[str, object] | None:
    """Ask the node daemon running on this machine for its view, if there is one."""
    from .localnode import LocalNode, NodeUnavailable, RequestFailed

    node = LocalNode.find(state_dir, key, grid)
    if node is None:
        return None
    try:
        return asyncio.run(node.ask("status", timeout=3))
    except (NodeUnavailable, RequestFailed):
        return None


def _view_status(view: GridView) -> dict[str, object]:
    now = time.time()
    return {
        "nodes": [r.to_json(now) for r in view.sorted_nodes()],
        "ignored": dict(view.ignored_summary()),
        "dropped": dict(view.dropped),
    }


def _browse_status(grid: str, key: GridKey, addresses: list[str] | None, seconds: float) -> dict[str, object]:
    from .mdns import browse

    return _view_status(asyncio.run(browse(grid, key, addresses, seconds)))


def _table(status: dict[str, object], source: str) -> Table:
    from rich.table import Table

    nodes = status["nodes"]
    assert isinstance(nodes, list)
    table = Table(title=f"{len(nodes)} node(s) — {source}", title_justify="left")
    for col in ("host", "id", "state", "CE", "cpus", "memory", "load", "capabilities", "age"):
        table.add_column(col, justify="right" if col in ("cpus", "memory", "load", "age") else "left")
    colours = {"idle": "green", "worker": "yellow", "coordinator": "bold cyan"}
    for n in nodes:
        table.add_row(
            n["host"], n["id"][:8], f"[{colours[n['state']]}]{n['state']}[/]", n["ce"] or "",
            f"{n['free_slots']}/{n['cpus']}", format_size(n["memory"]), f"{n['load']:.2f}",
            ",".join(n["caps"]), f"{n['age']:.0f}s",
        )
    notes = [note] if (note := _not_lent(status)) else []
    ignored = status.get("ignored") or {}
    if ignored:
        assert isinstance(ignored, dict)
        total = sum(ignored.values())
        notes.append(f"ignored {total} service(s): " + ", ".join(f"{k} {v}" for k, v in sorted(ignored.items())))
    table.caption = "\n".join(notes) or None
    return table


def _not_lent(status: dict[str, object]) -> str | None:
    """Why the local node is missing from its own table: its owner policy took it out of the grid."""
    if not status.get("owner_busy") or status.get("state") != "idle":
        return None
    host, reason = status.get("host"), status.get("owner_reason")
    return f"this node ({host}) is not lent to the grid: the owner needs it ({reason})"


@app.command()
def nodes(
    key_file: KeyFileOpt = None,
    grid: GridOpt = "default",
    state_dir: StateDirOpt = None,
    interface: InterfaceOpt = None,
    timeout: Annotated[float, typer.Option(help="Seconds to browse the network.", min=0.1)] = 2.0,
    watch: Annotated[bool, typer.Option("--watch", "-w", help="Keep a live view (Ctrl-C to stop).")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON list of nodes.")] = False,
    browse_only: Annotated[
        bool, typer.Option("--browse", help="Browse mDNS even when a local node daemon could answer.")
    ] = False,
) -> None:
    """Show the live grid: every node of this grid, its state, CE and resources."""
    check_grid(grid)
    key = load_key(key_file)
    sd = state_dir or default_state_dir()
    addresses = addresses_for(interface) if interface else None

    def look(seconds: float) -> tuple[dict[str, object], str]:
        if not browse_only:
            local = _local_status(sd, key, grid)
            if local is not None:
                return local, f"view of local node {str(local.get('id', ''))[:8]}"
        return _browse_status(grid, key, addresses, seconds), f"browsed for {seconds:g}s"

    if watch:
        from rich.live import Live

        with Live(console=out.rich, refresh_per_second=2) as live, contextlib.suppress(KeyboardInterrupt):
            local = None if browse_only else _local_status(sd, key, grid)
            if local is None:  # one long-lived browser, redrawn every second
                from .mdns import browse

                source = "live mDNS browse"
                asyncio.run(browse(grid, key, addresses, math.inf,
                                   every=lambda v: live.update(_table(_view_status(v), source))))
            while True:  # ask the local daemon once a second
                status, source = look(timeout)
                live.update(_table(status, source))
                time.sleep(1.0)
        return
    status, source = look(timeout)
    if as_json:
        print(json.dumps(status["nodes"], indent=2))
        err.print(f"source: {source}", highlight=False, soft_wrap=True)
        if note := _not_lent(status):
            err.print(note, highlight=False, soft_wrap=True)
        ignored = status.get("ignored") or {}
        if ignored:
            err.print(f"ignored: {json.dumps(ignored)}", highlight=False, soft_wrap=True)
        return
    out.print(_table(status, source))


@app.command()
def demo(
    nodes: Annotated[int, typer.Option("--nodes", "-n", help="How many desktops to simulate.", min=2, max=50)] = 4,
    workdir: Annotated[Path, typer.Option(help="Where the demo keeps keys, state and logs.")] = Path(".demo"),
    keep: Annotated[float, typer.Option(help="Keep the grid up this many seconds at the end.", min=0)] = 0.0,
) -> None:
    """Run a demo grid on this machine: namespaced desktops find each other (needs root)."""
    from .demo import run_demo

    raise typer.Exit(run_demo(nodes, workdir.resolve(), out, keep))


def main() -> None:
    # Everything the imports built lives as long as the command: frozen, the cycle collector never
    # walks it again, nor at exit. `submit` up to its first request, 8 runs each way: 0.22-0.32 s
    # against 0.28-0.34 s. A node daemon freezes again once it is up (node.tune_gc).
    gc.freeze()
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    app()


from . import cli_jobs  # noqa: E402, F401  (registers the job commands on `app`)
