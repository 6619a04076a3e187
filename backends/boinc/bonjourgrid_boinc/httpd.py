"""The project's HTTP side: master page, scheduler, downloads, uploads, on a threaded HTTP/1.1 server.

HTTP/1.1 because the client's libcurl sends `Expect: 100-continue` on
uploads. Handlers are plain callables; the scheduler one bridges into the
coordinator's event loop. The master page and the scheduler get the Host
header: replies name URLs on the address the client used (a worker's loopback
relay), not on ours.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

log = logging.getLogger("bonjourgrid.boinc.http")

MAX_BODY = 1 << 30


class ProjectServer:
    def __init__(self, address: str, port: int, prefix: str, *, master: Callable[[str | None], bytes],
                 scheduler: Callable[[str, str | None, bytes], bytes], upload: Callable[[bytes], bytes],
                 download: Callable[[str], Path | None]) -> None:
        """`download(name)` gives the file to serve, or None (404)."""
        self.prefix = prefix.strip("/")
        self.master, self.scheduler, self.upload, self.download = master, scheduler, upload, download
        srv = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, fmt: str, *args: object) -> None:
                log.debug("%s " + fmt, self.client_address[0], *args)

            def _send(self, code: int, body: bytes, ctype: str = "text/xml") -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _route(self) -> str | None:
                path = self.path.split("?", 1)[0]
                head = f"/{srv.prefix}/"
                return path[len(head):] if path.startswith(head) or path + "/" == head else None

            def do_GET(self) -> None:
                rest = self._route()
                if rest == "" or self.path.split("?", 1)[0].rstrip("/") == f"/{srv.prefix}":
                    return self._send(200, srv.master(self.headers.get("Host")), "text/html")
                if rest and rest.startswith("download/"):
                    name = rest.removeprefix("download/")
                    f = srv.download(name) if "/" not in name and not name.startswith(".") else None
                    if f is not None and f.is_file():
                        return self._send(200, f.read_bytes(), "application/octet-stream")
                self._send(404, b"not found\n", "text/plain")

            do_HEAD = do_GET

            def do_POST(self) -> None:
                rest = self._route()
                n = int(self.headers.get("Content-Length") or 0)
                if rest is None or not 0 <= n <= MAX_BODY:
                    return self._send(404, b"not found\n", "text/plain")
                body = self.rfile.read(n)
                try:
                    if rest == "cgi":
                        return self._send(200, srv.scheduler(self.client_address[0], self.headers.get("Host"), body))
                    if rest == "file_upload_handler":
                        return self._send(200, srv.upload(body))
                except Exception:
                    log.exception("BOINC project: %s failed", rest)
                    return self._send(500, b"internal error\n", "text/plain")
                self._send(404, b"not found\n", "text/plain")

        self.httpd = ThreadingHTTPServer((address, port), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="boinc-project", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
