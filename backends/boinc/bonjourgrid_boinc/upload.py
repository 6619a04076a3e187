"""BOINC's file upload handler: only files we asked for, resumable, size-capped, md5-checked at the end."""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Callable
from pathlib import Path

from .protocol import UploadRequest, parse_upload, upload_reply


class UploadStore:
    def __init__(self, root: Path, allowed: Callable[[str], int | None]) -> None:
        """`allowed(name)` gives the size cap of an output we issued, or None for anything else."""
        self.root = root
        self.allowed = allowed
        self._lock = threading.Lock()
        root.mkdir(parents=True, exist_ok=True)

    def path(self, name: str) -> Path:
        return self.root / name

    def handle(self, body: bytes) -> bytes:
        try:
            req = parse_upload(body)
        except ValueError as e:
            return upload_reply(-1, str(e))
        cap = self.allowed(req.name)
        if cap is None or "/" in req.name or req.name.startswith("."):
            return upload_reply(-1, f"no such upload: {req.name}")
        target = self.path(req.name)
        if req.size_query:
            return upload_reply(0, file_size=target.stat().st_size if target.exists() else 0)
        return self._write(req, target, cap)

    def _write(self, req: UploadRequest, target: Path, cap: int) -> bytes:
        if req.offset + len(req.data) > cap or req.nbytes > cap:
            return upload_reply(-1, "file too large")
        with self._lock:
            have = target.stat().st_size if target.exists() else 0
            if req.offset > have:
                return upload_reply(1, "offset beyond what was received")
            fd = os.open(target, os.O_WRONLY | os.O_CREAT, 0o600)
            try:
                os.ftruncate(fd, req.offset)
                os.lseek(fd, req.offset, os.SEEK_SET)
                os.write(fd, req.data)
            finally:
                os.close(fd)
            complete = req.nbytes and target.stat().st_size >= req.nbytes and req.md5
            if complete and hashlib.md5(target.read_bytes()).hexdigest() != req.md5:
                target.unlink()
                return upload_reply(1, "md5 mismatch: send it again")
        return upload_reply(0)
