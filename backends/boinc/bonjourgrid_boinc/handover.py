"""What a worker's client hands over to a new coordinator: outputs it uploaded to the old one, not yet reported.

Why: the client uploads a result's output, then reports the result in a later
scheduler request (seconds later: its scheduler polls every 5 s). An output
uploaded to a coordinator that then died is gone, and the client never sends a
file twice: reported to the successor, the result would come without output and
the task would run again. The output file stays in the client's project
directory until the result is acknowledged, so the worker half posts it to the
successor's upload handler itself, before the relay lets the report through.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

from .protocol import UPLOAD_PATH, output_file_name, task_of, upload_head

log = logging.getLogger("bonjourgrid.boinc.handover")

FILES_UPLOADED = 5  # BOINC result state: every output file uploaded
TIMEOUT_S = 30.0
CHUNK = 1 << 20


def to_hand_over(held: list[tuple[str, int]], project_dir: Path) -> list[Path]:
    """Outputs of our results the client counts as uploaded (name, state pairs), which are still on disk."""
    out = []
    for name, state in held:
        path = project_dir / output_file_name(name)
        if state == FILES_UPLOADED and task_of(name) is not None and path.is_file():
            out.append(path)
    return out


def post_output(project_url: str, path: Path) -> bool:
    """Upload one whole output file to a project's upload handler (blocking). True if it was accepted."""
    md5 = hashlib.md5()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            md5.update(chunk)
    size = path.stat().st_size
    head = upload_head(path.name, size, md5.hexdigest())
    parts = urlsplit(project_url)
    conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=TIMEOUT_S)

    def body() -> Iterator[bytes]:
        yield head
        with path.open("rb") as f:
            yield from iter(lambda: f.read(CHUNK), b"")

    try:
        conn.request("POST", parts.path + UPLOAD_PATH, body=body(),
                     headers={"Content-Length": str(len(head) + size), "Content-Type": "application/octet-stream"})
        reply = conn.getresponse().read()
    finally:
        conn.close()
    return b"<status>0</status>" in reply
