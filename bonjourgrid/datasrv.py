"""The CE's data endpoint: workers fetch job inputs and upload large outputs over HTTP.

Files are addressed by sha256 on the way in and checked by sha256 on the way
out; every request carries an HMAC token made with the grid key, so nobody
outside the grid reads a job's data or plants an output. Small outputs never
come here: they travel inline with the result message.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import io
import logging
import os
import re
import shutil
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from .gridkey import GridKey
from .sandbox import safe_join

log = logging.getLogger(__name__)

TOKEN_WINDOW_S = 120
CHUNK = 1 << 20
SHUTDOWN_POLL_S = 0.05
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")
_OUT_RE = re.compile(r"^/outputs/(\d{1,9})/(\d{1,6})/(.+)$")  # PUT: an attempt's upload
_REC_RE = re.compile(r"^/outputs/(\d{1,9})/(.+)$")  # GET: a recorded output


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _token(key: bytes, method: str, path: str, ts: int) -> str:
    return hmac.new(key, f"{method} {path} {ts}".encode(), hashlib.sha256).hexdigest()


def auth_header(key: GridKey, ce: str, method: str, path: str) -> str:
    ts = int(time.time())
    return f"BG {ts}:{_token(key.derive('data/' + ce), method, path, ts)}"


class DataServer:
    """Serves `inputs/<sha256>` and accepts `outputs/<index>/<attempt>/<path>` into a staging dir."""

    def __init__(self, key: GridKey, ce: str, inputs_dir: Path, staging_dir: Path, host: str,
                 max_upload: int = 64 << 30, outputs_dir: Path | None = None,
                 on_storage_error: Callable[[str], None] | None = None) -> None:
        self._key = key.derive("data/" + ce)
        self.inputs_dir = inputs_dir
        self.staging_dir = staging_dir
        self.outputs_dir = outputs_dir  # recorded outputs, fetched by replicas
        self.max_upload = max_upload
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, fmt: str, *args: object) -> None:
                log.debug("data %s: " + fmt, self.client_address[0], *args)

            def _authorized(self) -> bool:
                header = self.headers.get("Authorization", "")
                try:
                    scheme, rest = header.split(" ", 1)
                    ts_text, mac = rest.split(":", 1)
                    ts = int(ts_text)
                except ValueError:
                    return False
                if scheme != "BG" or abs(time.time() - ts) > TOKEN_WINDOW_S:
                    return False
                return hmac.compare_digest(_token(outer._key, self.command, self.path, ts), mac)

            def _reply(self, code: int, text: str = "") -> None:
                body = text.encode()
                if code >= 400:  # an upload refused half read: its rest must not pass for a next request
                    self.close_connection = True
                self.send_response(code)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                if not self._authorized():
                    log.warning("refused data request from %s: bad token", self.client_address[0])
                    return self._reply(403, "forbidden")
                path = outer._resolve_get(self.path)
                if path is None or not path.is_file():
                    return self._reply(404, "no such file")
                self.send_response(200)
                self.send_header("Content-Length", str(path.stat().st_size))
                self.end_headers()
                with open(path, "rb") as f:
                    shutil.copyfileobj(f, self.wfile, CHUNK)

            def do_PUT(self) -> None:
                if not self._authorized():
                    log.warning("refused upload from %s: bad token", self.client_address[0])
                    return self._reply(403, "forbidden")
                m = _OUT_RE.match(self.path)
                want = self.headers.get("X-SHA256", "")
                try:
                    length = int(self.headers.get("Content-Length", "-1"))
                except ValueError:
                    length = -1
                if not m or not _SHA_RE.match(want) or not 0 <= length <= outer.max_upload:
                    return self._reply(400, "bad upload request")
                try:
                    dest = safe_join(outer.staging_dir / f"{m[1]}-{m[2]}", urllib.parse.unquote(m[3]))
                except ValueError as e:
                    return self._reply(400, str(e))
                tmp = dest.with_name(dest.name + ".part")
                h, left = hashlib.sha256(), length
                try:
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    with open(tmp, "wb") as f:
                        while left:
                            try:
                                chunk = self.rfile.read(min(CHUNK, left))
                            except OSError as e:
                                raise ConnectionError(f"upload cut short: {e}") from None
                            if not chunk:
                                raise ConnectionError("upload cut short")
                            left -= len(chunk)
                            h.update(chunk)
                            f.write(chunk)
                except ConnectionError as e:
                    tmp.unlink(missing_ok=True)
                    log.warning("upload of %s failed: %s", self.path, e)
                    return self._reply(500, f"could not store the upload: {e}")
                except OSError as e:  # our disk is full, say: the worker keeps the file and tries again
                    tmp.unlink(missing_ok=True)
                    log.debug("upload of %s refused: %s", self.path, e)
                    if on_storage_error is not None:
                        on_storage_error(f"cannot store uploaded outputs: {e}")
                    with contextlib.suppress(OSError):  # read the rest, or the sender sees a broken pipe, not why
                        while left and (chunk := self.rfile.read(min(CHUNK, left))):
                            left -= len(chunk)
                    return self._reply(HTTPStatus.INSUFFICIENT_STORAGE, f"the coordinator cannot store it: {e}")
                if h.hexdigest() != want:
                    tmp.unlink(missing_ok=True)
                    return self._reply(422, "sha256 mismatch")
                os.replace(tmp, dest)
                self._reply(201, "stored")

        self._httpd = ThreadingHTTPServer((host, 0), Handler)
        self._httpd.daemon_threads = True
        self.url = f"http://{host}:{self._httpd.server_address[1]}"
        # shutdown() waits for the serve loop to look at its flag, once per poll interval: the
        # default 0.5 s was most of the time from a job's end to its node being Idle again.
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(SHUTDOWN_POLL_S,), name="bg-data",
                                        daemon=True)

    def _resolve_get(self, url_path: str) -> Path | None:
        """`/inputs/<sha256>` or `/outputs/<index>/<path>`; None for anything else or outside."""
        if url_path.startswith("/inputs/"):
            sha = url_path.removeprefix("/inputs/")
            return self.inputs_dir / sha if _SHA_RE.match(sha) else None
        m = _REC_RE.match(url_path)
        if m and self.outputs_dir is not None:
            try:
                return safe_join(self.outputs_dir / m[1], urllib.parse.unquote(m[2]))
            except ValueError:
                return None
        return None

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


class DataError(Exception):
    pass


class StorageError(DataError):
    """The file could not be stored (a full disk; here for a download, at the coordinator for an
    upload): not the sender's fault, and it may work later."""


def _store(f: io.FileIO, data: bytes, dest: Path) -> None:
    """All of `data` into a download's unbuffered file: a full disk fails here, as a StorageError."""
    view = memoryview(data)
    while view:
        try:
            view = view[f.write(view) or 0:]
        except OSError as e:
            raise StorageError(f"cannot write {dest}: {e}") from None


def fetch(url: str, key: GridKey, ce: str, sha: str, dest: Path, timeout: float = 60.0,
          path: str | None = None) -> None:
    """Download input `sha` (or the file at `path`) to `dest`, checking its sha256 (blocking: call in a thread)."""
    path = path or f"/inputs/{sha}"
    req = urllib.request.Request(url + path, headers={"Authorization": auth_header(key, ce, "GET", path)})
    tmp = dest.with_name(dest.name + ".part")
    h = hashlib.sha256()
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            try:  # unbuffered: a full disk fails a write, not a later flush; closed by the `with` below
                f = open(tmp, "wb", buffering=0)  # noqa: SIM115
            except OSError as e:
                raise StorageError(f"cannot write {dest}: {e}") from None
            with f:
                while chunk := r.read(CHUNK):
                    h.update(chunk)
                    _store(f, chunk, dest)
    except StorageError:
        tmp.unlink(missing_ok=True)
        raise
    except (urllib.error.URLError, OSError) as e:
        tmp.unlink(missing_ok=True)
        raise DataError(f"cannot fetch input {sha[:12]} from {url}: {e}") from None
    if h.hexdigest() != sha:
        tmp.unlink(missing_ok=True)
        raise DataError(f"input {sha[:12]} arrived corrupted (sha256 mismatch)")
    os.replace(tmp, dest)


def upload(url: str, key: GridKey, ce: str, index: int, attempt: int, rel: str, src: Path, sha: str,
           timeout: float = 300.0) -> None:
    """Upload one output file (blocking: call in a thread)."""
    path = f"/outputs/{index}/{attempt}/{urllib.request.quote(rel)}"
    try:
        with open(src, "rb") as f:  # gone or unreadable since it was hashed: the attempt fails, clearly
            req = urllib.request.Request(url + path, data=f, method="PUT", headers={
                "Authorization": auth_header(key, ce, "PUT", path), "X-SHA256": sha,
                "Content-Length": str(os.fstat(f.fileno()).st_size),
            })
            with urllib.request.urlopen(req, timeout=timeout) as r:
                r.read()
    except urllib.error.HTTPError as e:
        if e.code == HTTPStatus.INSUFFICIENT_STORAGE:
            raise StorageError(f"cannot upload {rel} now: {e.read().decode(errors='replace')}") from None
        raise DataError(f"cannot upload {rel}: {e}") from None
    except (urllib.error.URLError, OSError) as e:
        raise DataError(f"cannot upload {rel}: {e}") from None
