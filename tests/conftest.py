"""Shared fixtures: grid keys, and the multi-host testbed (network namespaces on a private bridge)."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from bonjourgrid.testbed import Host, Proc, Testbed, bonjourgrid_argv, can_build, wait_for

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "docker-engine.sh"


@contextlib.contextmanager
def small_disk(path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of `size` at `path`, for full-disk tests. Mount it before the node that must see it
    starts: each host's mount namespace is a copy taken when its process starts."""
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def grow(disk: Path) -> None:
    """Space again on a `small_disk`, while the nodes run."""
    subprocess.run(["mount", "-o", "remount,size=256m", str(disk)], check=True)


def last_summary(proc: Proc) -> dict:
    """The summary that `submit --json` printed last, from its combined output."""
    return json.loads([ln for ln in proc.output().splitlines() if ln.startswith("{")][-1])


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    return make_key(tmp_path / "grid.key")


def make_key(path: Path) -> Path:
    subprocess.run(bonjourgrid_argv("init", "--key-file", str(path)), check=True, capture_output=True)
    return path


@dataclass
class GridNode:
    """A `bonjourgrid node` daemon running in a testbed host."""

    host: Host
    proc: Proc
    state_dir: Path
    key_file: Path
    grid: str

    def cli_argv(self, *args: str) -> list[str]:
        """A `bonjourgrid` command line aimed at this node (its key, grid and state dir)."""
        head = [a for a in args if a != "--"]
        tail: list[str] = []
        if "--" in args:
            cut = args.index("--")
            head, tail = list(args[:cut]), list(args[cut:])
        return bonjourgrid_argv(*head, "--key-file", str(self.key_file), "--grid", self.grid,
                                "--state-dir", str(self.state_dir), *tail)

    def cli(self, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        return self.host.run(self.cli_argv(*args), timeout=timeout)

    def view(self) -> tuple[list[dict], dict]:
        """(nodes, ignored counts) as this node's daemon sees the grid."""
        r = self.cli("nodes", "--json")
        assert r.returncode == 0, r.stderr
        assert "source: view of local node" in r.stderr, r.stderr  # the daemon's own view, not a browse
        ignored = {}
        for line in r.stderr.splitlines():
            if line.startswith("ignored: "):
                ignored = json.loads(line.removeprefix("ignored: "))
        return json.loads(r.stdout), ignored

    def sees(self) -> dict[str, str]:
        """host name -> state, for every node in this node's view."""
        return {n["host"]: n["state"] for n in self.view()[0]}

    @property
    def up(self) -> bool:
        return (self.state_dir / "node.json").exists()


class Grid:
    """Starts nodes in testbed hosts and waits for them."""

    def __init__(self, testbed: Testbed, key_file: Path, workdir: Path) -> None:
        self.testbed = testbed
        self.key_file = key_file
        self.workdir = workdir

    def start(self, host: Host, *args: str, grid: str = "default", key_file: Path | None = None,
              wait: bool = True) -> GridNode:
        state_dir = self.workdir / f"{host.name}-{grid}-state"
        key = key_file or self.key_file
        argv = bonjourgrid_argv(
            "node", "--key-file", str(key), "--grid", grid, "--state-dir", str(state_dir), "--name", host.name,
            "--sample-interval", "0.5", "--log-level", "debug",
            # tests load the machine and fill small disks: no owner policy unless a test asks for one
            *(() if "--owner-cpu" in args else ("--owner-cpu", "100")),
            *(() if "--disk-reserve" in args else ("--disk-reserve", "0")),
            *args,
        )
        node = GridNode(host, host.spawn(argv, f"node-{grid}"), state_dir, key, grid)
        if wait:
            wait_for(lambda: node.up or not node.proc.alive(), 30, what=f"node on {host.name}")
            assert node.proc.alive(), node.proc.output()[-3000:]
        return node

    def start_all(self, *args: str, **kw: object) -> list[GridNode]:
        nodes = [self.start(h, *args, wait=False, **kw) for h in self.testbed.hosts]  # type: ignore[arg-type]
        for n in nodes:
            wait_for(lambda n=n: n.up or not n.proc.alive(), 30, what=f"node on {n.host.name}")
            assert n.proc.alive(), n.proc.output()[-3000:]
        return nodes


@pytest.fixture
def testbed(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[callable]:
    """`testbed(n)` builds n hosts; everything is torn down after the test, pass or fail."""
    reason = can_build()
    if reason:
        pytest.skip(reason)
    built: list[Testbed] = []

    def build(n: int) -> Testbed:
        tb = Testbed(n, tmp_path / f"tb{len(built)}")
        built.append(tb)
        tb.create()
        return tb

    try:
        yield build
    finally:
        failed = getattr(request.node, "rep_call", None)
        for tb in built:
            if failed is not None and failed.failed:
                for h in tb.hosts:
                    for p in h.procs:
                        print(f"---- {h.name} {' '.join(p.argv[2:4])} ----\n{p.output()[-4000:]}")
            tb.destroy()


@pytest.fixture
def grid(testbed, key_file: Path, tmp_path: Path) -> callable:
    """`grid(n)` -> a Grid on n fresh hosts."""

    def make(n: int) -> Grid:
        return Grid(testbed(n), key_file, tmp_path)

    return make


@pytest.hookimpl(tryfirst=True, hookwrapper=True)
def pytest_runtest_makereport(item, call):  # keep the call report so fixtures can print logs of failed tests
    outcome = yield
    rep = outcome.get_result()
    setattr(item, f"rep_{rep.when}", rep)


def _engine_up() -> bool:
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=20, check=False).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.fixture(scope="session")
def docker_image() -> str:
    """Start (or find) the engine and the test image; skip with a reason where that is impossible."""
    if os.geteuid() != 0 and not _engine_up():
        pytest.skip("no docker engine running and not root: cannot start one (run scripts/docker-engine.sh as root)")
    if os.geteuid() == 0:
        r = subprocess.run(["bash", str(SCRIPT), "start"], capture_output=True, text=True, timeout=900, check=False)
        if r.returncode != 0:
            pytest.fail(f"scripts/docker-engine.sh failed:\n{r.stdout}\n{r.stderr}")
    # Loaded by path: tests/ is not a package, and this must work without PYTHONPATH=. too.
    spec = importlib.util.spec_from_file_location("bonjourgrid_test_docker_image", ROOT / "tests" / "docker_image.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.ensure_test_image()
