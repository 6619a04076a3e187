"""`bonjourgrid demo`: a whole grid on this one machine, to see BonjourGrid work in a minute.

Each node runs in its own network namespace on a private bridge (needs
root), so the demo's mDNS traffic never leaves the machine.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

from rich.console import Console

from .testbed import Host, Testbed, TestbedError, bonjourgrid_argv, can_build, wait_for


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
                                        "--name", f"desk{h.index}", "--owner-cpu", "100",
                                        "--disk-reserve", "256M")
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
            code = _run_job(first, key, workdir, console)
            console.print(first.run(cli).stdout)
            if keep:
                console.print(f"keeping the grid up for {keep:g}s; logs in {tb.workdir}")
                time.sleep(keep)
            for _, p in nodes:
                p.stop()
    except (TestbedError, TimeoutError) as e:
        console.print(f"[red]demo failed:[/] {e}")
        return 1
    if code:
        console.print("[red]the demo job did not complete[/]")
        return 1
    console.rule("[bold green]demo done")
    return 0


def _run_job(host: Host, key: Path, workdir: Path, console: Console) -> int:
    """Submit the Monte Carlo pi example from the first desktop and combine its results."""
    job = Path(__file__).resolve().parent.parent / "examples" / "pi" / "pi.toml"
    if not job.is_file():
        console.print(f"[red]example job {job} is missing[/]")
        return 1
    results = workdir / "results"
    console.print(f"[bold]desk1 submits {job.name}[/]: 9 Monte Carlo tasks, recruited desktops run them\n")
    argv = bonjourgrid_argv("submit", str(job), "--key-file", str(key), "--state-dir",
                            str(workdir / host.name), "--results", str(results))
    code = subprocess.call(["ip", "netns", "exec", host.netns, *argv])
    if code:
        return code
    inside = darts = 0
    for f in sorted(results.glob("*/outputs/result-*.txt")):
        seed, n, hits, estimate = f.read_text().split()
        inside, darts = inside + int(hits), darts + int(n)
        console.print(f"  task {f.parts[-3]}: seed {seed:>2}, {int(n):>9,} darts -> pi ~ {float(estimate):.5f}")
    console.print(f"[bold]combined: {darts:,} darts -> pi ~ {4 * inside / darts:.5f}[/]  (results in {results})\n")
    return 0
