"""`bonjourgrid demo`: a whole grid on this one machine, to see BonjourGrid work in a minute.

Each node runs in its own network namespace on a private bridge (needs
root), so the demo's mDNS traffic never leaves the machine.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from rich.console import Console

from .testbed import Testbed, TestbedError, bonjourgrid_argv, can_build, wait_for


def run_demo(n_nodes: int, workdir: Path, console: Console, keep: float = 0.0) -> int:
    reason = can_build()
    if reason:
        console.print(f"[red]The demo builds {n_nodes} namespaced hosts: {reason}.[/] Run it with sudo.")
        return 2
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    key = workdir / "grid.key"
    from .gridkey import GridKey

    GridKey.generate().write(key)
    console.rule(f"[bold]BonjourGrid demo: {n_nodes} desktops on a private bridge")
    try:
        with Testbed(n_nodes, workdir / "hosts") as tb:
            nodes = []
            for h in tb.hosts:
                argv = bonjourgrid_argv("node", "--key-file", str(key), "--state-dir", str(workdir / h.name),
                                        "--name", f"desk{h.index}", "--owner-cpu", "100")
                nodes.append((h, h.spawn(argv, "node")))
                console.print(f"started node [bold]desk{h.index}[/] on {h.ip} (namespace {h.netns})")
            t0 = time.monotonic()
            first = tb.hosts[0]
            cli = [*bonjourgrid_argv("nodes", "--key-file", str(key), "--state-dir", str(workdir / first.name))]

            def all_seen() -> bool:
                r = first.run([*cli, "--json"])
                return r.returncode == 0 and len(json.loads(r.stdout)) == n_nodes

            wait_for(all_seen, 60, 0.2, "every node to be seen")
            console.print(f"desk1 sees all {n_nodes} nodes {time.monotonic() - t0:.1f}s after they started\n")
            console.print(first.run(cli).stdout)
            if keep:
                console.print(f"keeping the grid up for {keep:g}s; logs in {tb.workdir}")
                time.sleep(keep)
            for _, p in nodes:
                p.stop()
    except (TestbedError, TimeoutError) as e:
        console.print(f"[red]demo failed:[/] {e}")
        return 1
    console.rule("[bold green]demo done")
    return 0
