"""The CE's MQTT broker, started by the coordinator for each CE: Mosquitto if installed, else amqtt.

Mosquitto (a C broker from the distribution) costs a few microseconds of CPU per message; the
pip-installed amqtt about a millisecond, as much as a short task, on cores the tasks need. So a
coordinator uses Mosquitto when the binary is there (`--ce-broker auto`, the default) and amqtt
otherwise: nothing beyond pip is required, and a desktop with Mosquitto gets the faster one.

Either way the broker is a child process: it gets its own core and a broker crash cannot take
the coordinator down with it. It dies with the coordinator. amqtt watches its stdin pipe (EOF =
parent gone, whatever thread started it) and, when started from the main thread, also asks the
kernel for PR_SET_PDEATHSIG; Mosquitto is started from the event loop's thread with
PR_SET_PDEATHSIG (which fires when the *thread* that forked it exits).

Only grid members may connect: the broker accepts exactly one username/password pair, derived
from the grid key and the CE id by `bus.bus_credentials`. The password never appears on a command
line (which any local user can read in /proc): amqtt reads it on its stdin, Mosquitto from a
password file (PBKDF2-SHA512) we write, readable by us alone.

amqtt runs as `python -m bonjourgrid.broker --host H --port P`; the child reads one JSON line of
settings on stdin, prints `READY <port>` on stdout once it listens.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import ctypes
import functools
import hashlib
import hmac
import json
import logging
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from amqtt.plugins.base import BaseAuthPlugin

log = logging.getLogger("bonjourgrid.broker")  # not __main__ when run with -m

PR_SET_PDEATHSIG = 1
READY_TIMEOUT_S = 15.0
CE_BROKERS = ("auto", "mosquitto", "amqtt")
_PKG_PARENT = str(Path(__file__).resolve().parent.parent)


class BrokerError(Exception):
    """The broker could not be started; the message carries the tail of its log."""


@dataclass
class BrokerHandle:
    """A running broker child process; `stop()` is idempotent and safe from any thread."""

    url: str
    host: str
    port: int
    proc: subprocess.Popen[bytes]
    log_file: Path
    _owns_log: bool = False
    _cleanup: list[Path] = field(default_factory=list)
    _stopped: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, lines: int = 20) -> str:
        return _tail(self.log_file, lines)

    def stop(self, timeout: float = 3.0) -> None:
        """Ask the broker to stop (stdin EOF, then SIGTERM), SIGKILL it after `timeout`."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
        if self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        for p in self._cleanup:
            with contextlib.suppress(OSError):
                shutil.rmtree(p) if p.is_dir() else p.unlink()
        if self._owns_log:
            with contextlib.suppress(OSError):
                self.log_file.unlink()

    def __enter__(self) -> BrokerHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# -- the embedded broker (parent side) --------------------------------------------------


def start_embedded_broker(
    host: str,
    port: int = 0,
    *,
    username: str | None = None,
    password: str | None = None,
    log_file: Path | None = None,
    timeout: float = READY_TIMEOUT_S,
    verbose: bool = False,
) -> BrokerHandle:
    """Start an amqtt broker child listening on host:port (0 = any free port) and wait until it accepts.

    With username and password set, only that pair may connect; without, anyone may
    (use that only on loopback). Blocks for about a second (Python start-up); from
    asyncio code use `start_embedded_broker_async`.
    """
    if (username is None) != (password is None):
        raise ValueError("give both username and password, or neither")
    owns_log = log_file is None
    if log_file is None:
        fd, name = tempfile.mkstemp(prefix="bg-broker-", suffix=".log")
        os.close(fd)
        log_file = Path(name)
    log_file = Path(log_file)
    log_file.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "bonjourgrid.broker", "--host", host, "--port", str(port)]
    cmd += ["--parent-pid", str(os.getpid())]
    if threading.current_thread() is threading.main_thread():
        cmd.append("--pdeathsig")
    if verbose:
        cmd.append("--verbose")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_PKG_PARENT, env.get("PYTHONPATH")) if p)
    with open(log_file, "ab") as logf:
        proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=logf, env=env, start_new_session=True
        )
    handle = BrokerHandle(url="", host=host, port=port, proc=proc, log_file=log_file, _owns_log=owns_log)
    try:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(json.dumps({"username": username, "password": password}).encode() + b"\n")
        proc.stdin.flush()
        deadline = time.monotonic() + timeout
        actual = _read_ready(proc, deadline)
        probe = "127.0.0.1" if host in ("", "0.0.0.0") else ("::1" if host == "::" else host)
        _wait_accepting(probe, actual, deadline)
    except BaseException as e:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait()
        tail_before_stop = _tail(log_file)
        handle.stop(timeout=1.0)  # a temp log goes too: its tail is in the message
        if isinstance(e, BrokerError):
            where = "" if owns_log else f" {log_file}"
            raise BrokerError(f"{e}\n--- broker log{where} ---\n{tail_before_stop}") from None
        raise
    handle.port = actual
    handle.url = f"mqtt://{_url_host(probe if host in ('', '0.0.0.0', '::') else host)}:{actual}"
    log.info("embedded MQTT broker pid %d listening at %s", proc.pid, handle.url)
    return handle


async def start_embedded_broker_async(host: str, port: int = 0, **kwargs: object) -> BrokerHandle:
    """`start_embedded_broker` without blocking the event loop (the child is then only pipe-watched)."""
    return await asyncio.to_thread(start_embedded_broker, host, port, **kwargs)  # type: ignore[arg-type]


def _read_ready(proc: subprocess.Popen[bytes], deadline: float) -> int:
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    buf = b""
    while b"\n" not in buf:
        left = deadline - time.monotonic()
        if left <= 0:
            raise BrokerError(f"embedded broker did not report ready within {READY_TIMEOUT_S:.0f} s")
        ready, _, _ = select.select([fd], [], [], min(left, 0.2))
        if ready:
            chunk = os.read(fd, 256)
            if not chunk:
                proc.wait(1.0)
                raise BrokerError(f"embedded broker exited during start-up (exit code {proc.returncode})")
            buf += chunk
    line = buf.split(b"\n", 1)[0].decode(errors="replace").split()
    if len(line) != 2 or line[0] != "READY" or not line[1].isdigit():
        raise BrokerError(f"embedded broker said {buf[:80]!r} instead of READY <port>")
    return int(line[1])


def _wait_accepting(host: str, port: int, deadline: float, proc: subprocess.Popen[bytes] | None = None,
                    name: str = "broker") -> None:
    """Until host:port accepts a connection; a `proc` that exits meanwhile fails at once.

    Mosquitto listens about 10 ms after it starts: the first tries are close together (a fixed
    50 ms pause made every job wait 50 ms for its broker)."""
    pause = 0.002
    while True:
        if proc is not None and proc.poll() is not None:
            raise BrokerError(f"{name} exited during start-up (exit code {proc.returncode})")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError as e:
            if time.monotonic() > deadline:
                raise BrokerError(f"{name} does not accept connections on {host}:{port}: {e}") from None
            time.sleep(pause)
            pause = min(pause * 2, 0.05)


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _tail(path: Path, lines: int = 20) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 16384))
            text = f.read().decode(errors="replace")
    except OSError as e:
        return f"(cannot read log: {e.strerror})"
    return "\n".join(text.splitlines()[-lines:]) or "(log is empty)"


# -- Mosquitto ---------------------------------------------------------------------------------


def mosquitto_binary() -> str | None:
    return shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if os.path.exists("/usr/sbin/mosquitto") else None)


@functools.cache
def mosquitto_problem() -> str | None:
    """Why this machine's Mosquitto cannot carry a CE (not installed, older than 2.0), or None."""
    exe = mosquitto_binary()
    if exe is None:
        return "mosquitto is not installed (apt-get install mosquitto)"
    try:
        out = subprocess.run([exe, "-h"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError) as e:
        return f"cannot run {exe}: {e}"
    m = re.search(r"mosquitto version (\d+)\.", out)
    if m is None or int(m[1]) < 2:  # 1.x reads neither our config nor our password file
        return f"{exe} is not Mosquitto 2 or newer ({out.splitlines()[0] if out else 'no version'})"
    return None


def mosquitto_config(port: int, host: str = "127.0.0.1", password_file: Path | None = None) -> str:
    """A minimal mosquitto.conf: one listener, TCP_NODELAY (88 ms -> 0.35 ms per QoS 1 round trip), no persistence."""
    lines = [
        f"listener {port} {host}",
        "set_tcp_nodelay true",
        "persistence false",
        "max_queued_messages 100000",
        "log_dest stderr",
        "log_type error",
        "log_type warning",
        "log_type notice",
    ]
    if password_file is not None:
        lines += ["allow_anonymous false", f"password_file {password_file}"]
    else:
        lines += ["allow_anonymous true"]
    if os.geteuid() == 0:  # mosquitto drops root to user 'mosquitto', which could not read our temp files
        lines.append("user root")
    return "\n".join(lines) + "\n"


def mosquitto_password_line(username: str, password: str, iterations: int = 101) -> str:
    """One entry of a Mosquitto 2 password file, `$7$` format (PBKDF2-SHA512), as `mosquitto_passwd` writes it.

    Written here rather than by `mosquitto_passwd -b`, which takes the password on its command line.
    """
    if ":" in username or "\n" in username:
        raise ValueError("a Mosquitto user name cannot hold ':' or a newline")
    salt = os.urandom(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations)
    return f"{username}:$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}\n"


def _die_with_this_thread(parent_pid: int) -> Any:
    """A preexec_fn: the child gets SIGTERM when the thread that started it exits (or dies at once if it did)."""
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved here: no dlopen in the forked child

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent_pid:
            os._exit(1)

    return preexec


def start_mosquitto(
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    username: str | None = None,
    password: str | None = None,
    log_file: Path | None = None,
    timeout: float = 10.0,
    die_with_thread: bool = False,
) -> BrokerHandle:
    """Start `mosquitto` (>= 2.0) as a child with a config in a private temp dir; port 0 = a free port picked here.

    With `die_with_thread` the broker is stopped by the kernel when the calling thread exits
    (call it from the event loop's thread: it blocks only for the fork, not for the start-up).
    """
    handle = _spawn_mosquitto(host, port, username, password, log_file, die_with_thread)
    try:
        _wait_accepting(handle.host, handle.port, time.monotonic() + timeout, handle.proc, "mosquitto")
    except BrokerError as e:
        tail = _tail(handle.log_file)
        handle.stop(timeout=1.0)
        raise BrokerError(f"{e}\n--- mosquitto log ---\n{tail}") from None
    return handle


async def start_mosquitto_async(host: str, port: int = 0, *, timeout: float = 10.0, **kwargs: Any) -> BrokerHandle:
    """`start_mosquitto` tied to the event loop's thread, without blocking the loop while it starts.

    A free port picked here can be taken before Mosquitto binds it: then it tries another one.
    """
    for attempt in range(3 if port == 0 else 1):
        handle = _spawn_mosquitto(host, port, die_with_thread=True, **kwargs)
        try:
            await asyncio.to_thread(_wait_accepting, handle.host, handle.port, time.monotonic() + timeout,
                                    handle.proc, "mosquitto")
            return handle
        except BrokerError as e:
            tail = _tail(handle.log_file)
            await asyncio.to_thread(handle.stop, 1.0)
            if attempt == 2 or port != 0 or "Address already in use" not in tail:
                raise BrokerError(f"{e}\n--- mosquitto log ---\n{tail}") from None
    raise AssertionError("unreachable")


def _spawn_mosquitto(host: str, port: int, username: str | None = None, password: str | None = None,
                     log_file: Path | None = None, die_with_thread: bool = False,
                     config_dir: Path | None = None) -> BrokerHandle:
    exe = mosquitto_binary()
    if exe is None:
        raise BrokerError("mosquitto is not installed (apt-get install -y mosquitto)")
    if (username is None) != (password is None):
        raise ValueError("give both username and password, or neither")
    if port == 0:
        port = _free_port(host)
    # Mode 0700: the password file stays ours. In `config_dir` (a CE's own directory) it does not
    # litter /tmp when the coordinator is killed before it can remove it.
    tmp = Path(tempfile.mkdtemp(prefix="bg-mosquitto-", dir=config_dir))
    pwfile = None
    if username is not None and password is not None:
        pwfile = tmp / "passwd"
        pwfile.write_text(mosquitto_password_line(username, password))
    conf = tmp / "mosquitto.conf"
    conf.write_text(mosquitto_config(port, host, pwfile))
    owns_log = log_file is None
    log_file = Path(log_file) if log_file is not None else tmp / "mosquitto.log"
    preexec = _die_with_this_thread(os.getpid()) if die_with_thread else None
    with open(log_file, "ab") as logf:
        proc = subprocess.Popen([exe, "-c", str(conf)], stdin=subprocess.DEVNULL, stdout=logf, stderr=logf,
                                start_new_session=True, preexec_fn=preexec)
    handle = BrokerHandle(
        url=f"mqtt://{_url_host(host)}:{port}", host=host, port=port, proc=proc, log_file=log_file, _cleanup=[tmp]
    )
    handle._owns_log = owns_log
    return handle


async def start_ce_broker(kind: str, host: str, *, username: str, password: str, log_file: Path,
                          port: int = 0) -> BrokerHandle:
    """The broker of one CE: `kind` is one of CE_BROKERS (`auto`: Mosquitto if installed, else amqtt).

    `port`: the port of a broker of this CE that died, so that its clients find the new one.
    """
    if kind not in CE_BROKERS:
        raise BrokerError(f"unknown CE broker {kind!r} (expected one of {', '.join(CE_BROKERS)})")
    if kind == "mosquitto" or (kind == "auto" and mosquitto_problem() is None):
        try:
            handle = await start_mosquitto_async(host, port, username=username, password=password,
                                                 log_file=log_file, config_dir=log_file.parent)
        except BrokerError as e:
            if kind == "mosquitto":
                raise
            log.warning("CE broker: mosquitto did not start, using the built-in amqtt instead: %s", e)
        else:
            log.info("CE broker: mosquitto pid %d listening at %s", handle.pid, handle.url)
            return handle
    return await start_embedded_broker_async(host, port, username=username, password=password, log_file=log_file)


def _free_port(host: str) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


# -- the embedded broker (child side) --------------------------------------------------------


class GridAuthPlugin(BaseAuthPlugin):
    """amqtt auth plugin: accept exactly the CE's username/password pair (constant-time compare)."""

    @dataclass
    class Config:
        username: str = ""
        password: str = ""

    async def authenticate(self, *, session: object) -> bool:
        want_user = self.config.username.encode()
        want_pw = self.config.password.encode()
        user = (getattr(session, "username", None) or "").encode()
        pw = getattr(session, "password", None) or ""
        pw = pw.encode() if isinstance(pw, str) else bytes(pw)
        ok = hmac.compare_digest(user, want_user) & hmac.compare_digest(pw, want_pw)
        if not ok:
            log.warning("refused MQTT connection from client %r: bad credentials", getattr(session, "client_id", "?"))
        return bool(ok)


def _set_pdeathsig(sig: int = signal.SIGTERM) -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0) != 0:
            log.warning("prctl(PR_SET_PDEATHSIG) failed: errno %d", ctypes.get_errno())
    except (OSError, AttributeError) as e:  # not Linux: the stdin watch alone then ties us to the parent
        log.warning("cannot set PR_SET_PDEATHSIG: %s", e)


async def _serve(host: str, port: int, settings: dict[str, object]) -> None:
    from amqtt.broker import Broker

    username, password = settings.get("username"), settings.get("password")
    if username is not None:
        # amqtt imports plugins by dotted path (under `-m` this module is __main__, so name it in full)
        auth = {"bonjourgrid.broker.GridAuthPlugin": {"username": str(username), "password": str(password)}}
    else:
        auth = {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}}
    bind = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    config = {"listeners": {"default": {"type": "tcp", "bind": bind}}, "plugins": auth}
    broker = Broker(config)
    await broker.start()
    server = broker._servers["default"].instance  # amqtt has no public accessor for the bound port
    actual = server.sockets[0].getsockname()[1]
    sys.stdout.write(f"READY {actual}\n")
    sys.stdout.flush()

    loop = asyncio.get_running_loop()
    done = asyncio.Event()

    def on_stdin() -> None:
        try:
            data = os.read(sys.stdin.fileno(), 4096)
        except OSError:
            data = b""
        if not data:
            log.info("parent closed our stdin: stopping")
            loop.remove_reader(sys.stdin.fileno())
            done.set()

    loop.add_reader(sys.stdin.fileno(), on_stdin)
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, done.set)
    await done.wait()
    try:
        await asyncio.wait_for(broker.shutdown(), 3.0)
    except (TimeoutError, Exception):  # shutting down anyway; a broken shutdown must not keep us alive
        log.exception("broker shutdown did not complete cleanly")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bonjourgrid.broker", description="embedded MQTT broker of a CE")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--parent-pid", type=int, default=0, help="exit at once if this process is already gone")
    ap.add_argument("--pdeathsig", action="store_true", help="die when the parent thread dies (prctl)")
    ap.add_argument("--verbose", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not args.verbose:  # amqtt logs every connection at INFO and some expected disconnects at WARNING
        logging.getLogger("amqtt").setLevel(logging.ERROR)
    if args.pdeathsig:
        _set_pdeathsig()
    if args.parent_pid and os.getppid() != args.parent_pid:
        return 1  # the parent died before prctl took effect
    line = sys.stdin.buffer.readline()
    try:
        settings = json.loads(line) if line.strip() else {}
        if not isinstance(settings, dict):
            raise ValueError("settings must be a JSON object")
    except ValueError as e:
        log.error("bad settings on stdin: %s", e)
        return 2
    try:
        asyncio.run(_serve(args.host, args.port, settings))
    except Exception as e:
        log.debug("embedded broker failed", exc_info=True)
        log.error("embedded broker failed: %s", e)  # one line: the parent quotes the log's tail in its error
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
