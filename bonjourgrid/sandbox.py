"""Path confinement for task sandboxes.

A task's sandbox is a directory on the worker; the job author names inputs and outputs by
relative paths and globs inside it.  Everything here exists so that a hostile or buggy job
can never make the worker read or write outside that directory (``..``, absolute paths,
symlinks planted by the task itself, FIFOs that would block the hash loop).
"""

from __future__ import annotations

import fnmatch
import hashlib
import logging
import os
import re
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

log = logging.getLogger(__name__)

_MAGIC = re.compile(r"[*?\[]")
_HASH_CHUNK = 1 << 20


@dataclass(frozen=True)
class OutputFile:
    """One output file found in a sandbox; ``path`` is relative to the sandbox, posix style."""

    path: str
    size: int
    sha256: str

    def to_dict(self) -> dict[str, object]:
        return {"path": self.path, "size": self.size, "sha256": self.sha256}

    @classmethod
    def from_dict(cls, d: dict[str, object]) -> OutputFile:
        return cls(path=str(d["path"]), size=int(d["size"]), sha256=str(d["sha256"]))  # type: ignore[call-overload]


def _check_relative(rel: str, what: str) -> PurePosixPath:
    """Reject the lexical ways out of a sandbox: absolute paths, '..', NUL, empty names."""
    if not isinstance(rel, str) or not rel or "\x00" in rel:
        raise ValueError(f"{what} must be a non-empty string without NUL bytes: {rel!r}")
    if "\\" in rel:
        # Paths travel between machines as posix; a backslash is a sign of a Windows path or of trickery.
        raise ValueError(f"{what} must use '/' separators: {rel!r}")
    p = PurePosixPath(rel)
    if p.is_absolute():
        raise ValueError(f"{what} must be relative to the sandbox: {rel!r}")
    if ".." in p.parts:
        raise ValueError(f"{what} must not contain '..': {rel!r}")
    if not p.parts or p.parts == (".",):
        raise ValueError(f"{what} must name something inside the sandbox, not the sandbox itself: {rel!r}")
    return p


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def safe_join(sandbox: Path, rel: str) -> Path:
    """Join ``rel`` to ``sandbox`` or raise ValueError if the result could land outside it.

    Checked lexically (absolute, '..') and after resolving symlinks that already exist, so a
    symlink planted in the sandbox cannot redirect a later write.  Returns ``sandbox / rel``
    (unresolved); the target need not exist yet.
    """
    p = _check_relative(rel, "path")
    root = Path(sandbox).resolve()
    joined = Path(sandbox) / Path(*p.parts)
    if not _inside(joined.resolve(), root):
        raise ValueError(f"path resolves outside the sandbox: {rel!r}")
    return joined


def check_glob(pattern: str) -> None:
    """Raise ValueError for a glob that could only match outside the sandbox."""
    _check_relative(pattern, "output glob")


def _match_parts(pat: tuple[str, ...], parts: tuple[str, ...]) -> bool:
    """Glob match of path segments; '**' spans zero or more whole segments, '*' stays in one."""
    if not pat:
        return not parts
    head = pat[0]
    if head == "**":
        return any(_match_parts(pat[1:], parts[i:]) for i in range(len(parts) + 1))
    if not parts:
        return False
    return fnmatch.fnmatchcase(parts[0], head) and _match_parts(pat[1:], parts[1:])


def _sha256_regular(path: Path) -> tuple[int, str] | None:
    """Hash a regular file without following a final symlink or blocking on a FIFO."""
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(path, flags)
    except OSError as e:
        log.warning("output %s not readable: %s", path, e)
        return None
    try:
        st = os.fstat(fd)
    except OSError:
        os.close(fd)
        return None
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        return None
    with os.fdopen(fd, "rb") as f:
        h = hashlib.sha256()
        size = 0
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
            size += len(chunk)
        return size, h.hexdigest()


def _candidates(root: Path, pat: PurePosixPath) -> list[PurePosixPath]:
    """Relative paths under ``root`` that may match ``pat`` (files and symlinks, never followed dirs)."""
    literal: list[str] = []
    for part in pat.parts:
        if _MAGIC.search(part):
            break
        literal.append(part)
    if len(literal) == len(pat.parts):  # no wildcard: a single, direct lookup
        return [pat]
    start = root.joinpath(*literal)
    try:
        if start.is_symlink() or not start.is_dir() or not _inside(start.resolve(), root):
            return []
    except OSError:
        return []
    out: list[PurePosixPath] = []
    # followlinks=False: a symlinked directory (maybe to '/') is never descended, and loops cannot happen.
    for dirpath, _dirnames, filenames in os.walk(start, followlinks=False):
        rel_dir = PurePosixPath(Path(dirpath).relative_to(root).as_posix())
        out.extend(rel_dir / name for name in filenames)
    return out


def collect_outputs(sandbox: Path, globs: tuple[str, ...]) -> tuple[OutputFile, ...]:
    """Find the files in ``sandbox`` matched by ``globs``, hash them, return them sorted by path.

    Globs are posix, relative to the sandbox, with '*', '?', '[...]' inside one segment and
    '**' for any depth.  A glob that is absolute or contains '..' raises ValueError.
    Directories, FIFOs, sockets and devices are skipped; a symlink is kept only if it resolves
    to a regular file inside the sandbox (it is reported under the link's own path); one that
    points outside is skipped and logged.
    """
    root = Path(sandbox).resolve()
    found: dict[str, OutputFile] = {}
    for pattern in globs:
        pat = _check_relative(pattern, "output glob")
        pat_parts = tuple(x for x in pat.parts if x != ".")
        for rel in _candidates(root, PurePosixPath(*pat_parts)):
            key = rel.as_posix()
            if key in found or not _match_parts(pat_parts, rel.parts):
                continue
            full = root.joinpath(*rel.parts)
            try:
                real = full.resolve(strict=True)
            except (OSError, RuntimeError):
                continue  # missing, or a broken / looping symlink
            if not _inside(real, root):
                log.warning("output %s skipped: it resolves outside the sandbox (%s)", key, real)
                continue
            hashed = _sha256_regular(real)
            if hashed is None:
                continue
            size, digest = hashed
            found[key] = OutputFile(path=key, size=size, sha256=digest)
    return tuple(found[k] for k in sorted(found))


class SandboxPool:
    """One task directory per slot, emptied after each task and reused.

    Creating and removing a sandbox (and its tmp/) per task cost more than a short task itself
    on the test VM: on ext4 without a journal, every inode allocation skips, one by one, the
    inodes freed in the last minute or so, so removals make later creations slow. An emptied
    directory needs only a scandir. A directory that cannot be emptied (a task took away
    its permissions) is removed as well as possible and never reused.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self._free: list[Path] = []
        self._made = 0

    def take(self) -> Path:
        return self._free.pop() if self._free else self._make()

    def reserve(self, count: int) -> None:
        """Have `count` sandboxes (with their tmp/) made: while the first tasks are on their way."""
        while self._made < count:
            path = self._make()
            (path / "tmp").mkdir(exist_ok=True)
            self._free.append(path)

    def _make(self) -> Path:
        self._made += 1
        path = self.root / f"slot-{self._made}"
        path.mkdir(parents=True, exist_ok=True)
        return path

    def give_back(self, path: Path) -> None:
        if _empty(path):
            self._free.append(path)
        else:
            log.warning("sandbox %s could not be emptied: not reused", path)
            shutil.rmtree(path, ignore_errors=True)


def _empty(path: Path) -> bool:
    """Remove everything in `path` but an empty tmp/ (the next task's TMPDIR); False on failure."""
    try:
        with os.scandir(path) as it:
            entries = list(it)
        for e in entries:
            if e.is_dir(follow_symlinks=False):
                if e.name == "tmp":
                    with os.scandir(e.path) as inner:
                        if next(inner, None) is None:
                            continue
                shutil.rmtree(e.path)
            else:
                os.unlink(e.path)
        return True
    except OSError:
        return False
