"""Starting and stopping one `condor_master` per CE and host, wherever the daemons come from.

`BONJOURGRID_CONDOR_PREFIX` (a command prefix, shell-split) says how to reach the daemons:
empty means `condor_master` on PATH; the tests use `scripts/condor-chroot.sh ROOT` to run
Debian trixie's daemons in a chroot. The directory given as `bind` is exported to the prefix
as BONJOURGRID_CONDOR_BIND, so a chroot wrapper can make it visible at the same path.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shlex
import signal
import socket
from pathlib import Path

import psutil

log = logging.getLogger("bonjourgrid.condor")

PREFIX_ENV = "BONJOURGRID_CONDOR_PREFIX"
PORT_ENV = "BONJOURGRID_CONDOR_PORT"
DEFAULT_PORT = 9618
STOP_GRACE_S = 5.0


def prefix() -> list[str]:
    return shlex.split(os.environ.get(PREFIX_ENV, ""))


def port() -> int:
    return int(os.environ.get(PORT_ENV) or DEFAULT_PORT)


def pool_port(address: str) -> int:
    """The usual port if nothing listens on it at `address`, else a free one.

    A successor coordinator builds its pool on a host where its own worker half's daemons still
    hold the usual port: two shared-port daemons cannot both listen there, and the one that lost
    the race left the new pool unreachable ("Failed communication with collector").
    """
    for candidate in (port(), 0):
        with socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the daemons bind: TIME_WAIT is no obstacle
            try:
                s.bind((address, candidate))
            except OSError:
                continue
            return int(s.getsockname()[1])
    raise OSError(f"no free TCP port on {address} for the HTCondor pool")


def write_password(password_dir: Path, secret: bytes) -> None:
    """The pool password: hex (Condor reads it as a C string), readable by its owner only."""
    password_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = password_dir / "POOL"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secret.hex())


async def token(config: Path, bind: Path, identity: str) -> str:
    """An IDTOKEN for `identity`, signed with the pool key by Condor's own tool (run like the daemons)."""
    env = dict(os.environ, CONDOR_CONFIG=str(config), BONJOURGRID_CONDOR_BIND=str(bind))
    try:
        proc = await asyncio.create_subprocess_exec(
            *prefix(), "condor_token_create", "-identity", identity, "-key", "POOL", env=env,
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    except OSError as e:
        raise RuntimeError(f"cannot run HTCondor ({e}): install condor or set {PREFIX_ENV} "
                           "(docs/backends/condor.md)") from e
    out, err = await proc.communicate()
    if proc.returncode != 0 or not out.strip():
        raise RuntimeError(f"condor_token_create failed: {err.decode(errors='replace').strip()}")
    return out.decode().strip()


async def run_tool(config: Path, bind: Path, *argv: str) -> None:
    """Run a Condor command-line tool the way the daemons run (same prefix, config and bind)."""
    env = dict(os.environ, CONDOR_CONFIG=str(config), BONJOURGRID_CONDOR_BIND=str(bind))
    proc = await asyncio.create_subprocess_exec(*prefix(), *argv, env=env, stdin=asyncio.subprocess.DEVNULL,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"{argv[0]} failed: {out.decode(errors='replace').strip()}")


class Master:
    """A `condor_master -f` in its own session; stop() shuts the whole pool half down."""

    def __init__(self, config: Path, bind: Path, log_file: Path) -> None:
        self.config = config
        self.bind = bind
        self.log_file = log_file
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        env = dict(os.environ, CONDOR_CONFIG=str(self.config), BONJOURGRID_CONDOR_BIND=str(self.bind))
        argv = [*prefix(), "condor_master", "-f"]
        with open(self.log_file, "ab") as out:
            self.proc = await asyncio.create_subprocess_exec(
                *argv, env=env, stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True)
        log.info("condor_master started (pid %d): %s", self.proc.pid, shlex.join(argv))

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    async def stop(self) -> None:
        """SIGQUIT (Condor's fast shutdown: jobs killed, daemons exit), then SIGKILL whatever it left running.

        A daemon can hang in its last words to a collector that is already gone (the coordinator's pool
        stops at the same time): its descendants, noted first, are killed after a short grace.
        """
        p = self.proc
        if p is None:
            return
        family: list[psutil.Process] = []
        with contextlib.suppress(psutil.Error):
            family = psutil.Process(p.pid).children(recursive=True)
        if p.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, signal.SIGQUIT)
            try:
                await asyncio.wait_for(p.wait(), STOP_GRACE_S)
            except TimeoutError:
                log.warning("condor_master %d ignored SIGQUIT: killing its session", p.pid)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGKILL)
        for child in family:  # daemons and jobs left behind, if any (psutil checks the pid was not reused)
            with contextlib.suppress(psutil.Error):
                child.kill()
        if p.returncode is None:
            await p.wait()
