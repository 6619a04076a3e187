"""A replica's uploaded tarball, unpacked safely and read back as an `Outcome` (no network here)."""

from __future__ import annotations

import shutil
import tarfile
from pathlib import Path

from bonjourgrid.sandbox import collect_outputs

from .quorum import Outcome

MAX_STREAM = 1 << 20  # like the native backend: stdout and stderr kept up to 1 MiB each


def _float(path: Path) -> float:
    try:
        return float(path.read_text().strip() or 0)
    except (OSError, ValueError):
        return 0.0


def unpack(tar_path: Path, dest: Path, globs: tuple[str, ...]) -> Outcome:
    """Extract `meta/` and `out/` (no links, nothing outside `dest`) and match the job's output globs."""
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    with tarfile.open(tar_path) as tar:
        members = [m for m in tar.getmembers() if (m.isfile() or m.isdir())
                   and m.name.split("/", 1)[0] in ("meta", "out")]
        tar.extractall(dest, members=members, filter="data")
    meta, out = dest / "meta", dest / "out"
    out.mkdir(exist_ok=True)
    try:
        code = int((meta / "exit_code").read_text().strip())
    except (OSError, ValueError):
        code = -1
    files = collect_outputs(out, globs) if globs and code == 0 else ()
    return Outcome(
        exit_code=code,
        outputs=tuple(sorted((f.path, f.sha256, f.size) for f in files)),
        stdout=_read(meta / "stdout"),
        stderr=_read(meta / "stderr"),
        started_at=_float(meta / "started_at"),
        ended_at=_float(meta / "ended_at"),
        files=out,
    )


def _read(path: Path) -> bytes:
    try:
        with path.open("rb") as f:
            return f.read(MAX_STREAM)
    except OSError:
        return b""
