"""How long a desktop keeps what other people's jobs left on its disk.

A node that served as a replica holds a copy of the job's journal and of every output file under
`<state>/ces/<job>/`; a node asked for a job's results over the network writes them under
`<state>/exports/<job>/`; a worker killed in the middle of a CE leaves its task directories under
`<state>/work/<ce>/`. None of it is the owner's: a desktop lent to many CEs would fill up, as a
BOINC client would if it never deleted reported results. Each goes once nothing has touched it
for `keep_s` (a week by default). A replica copy is the last resort if the job's coordinator lost
its disk, hence a generous default; an export is made again on demand.

Never removed: the directory of a job submitted on this node (its owner's history, which
`bonjourgrid jobs` lists; the coordinator writes SUBMITTED_HERE there when the job is created, a
replica or a successor never does), and anything of a CE this node is in now.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

log = logging.getLogger(__name__)

DEFAULT_KEEP_S = 7 * 24 * 3600.0
PRUNE_EVERY_S = 3600.0
SUBMITTED_HERE = "job.json"
KINDS = ("ces", "exports", "work")


def _last_touched(path: Path) -> float:
    """The newest mtime of the directory and its direct entries (a journal's WAL moves, its dir may not)."""
    newest = path.stat().st_mtime
    with os.scandir(path) as entries:
        for e in entries:
            with contextlib.suppress(OSError):
                newest = max(newest, e.stat(follow_symlinks=False).st_mtime)
    return newest


def prune(state_dir: Path, busy: Iterable[str], keep_s: float, now: float) -> list[Path]:
    """Remove replica copies, exports and work directories untouched for `keep_s` seconds; returns them.

    `busy`: the CEs this node coordinates or works for right now, never touched. A directory
    that cannot be read or removed is logged and left for the next round.
    """
    busy = set(busy)
    removed = []
    for kind in KINDS:
        root = state_dir / kind
        try:
            candidates = [p for p in root.iterdir() if p.is_dir() and not p.is_symlink()]
        except FileNotFoundError:
            continue
        except OSError as e:
            log.warning("cannot list %s for clean-up: %s", root, e)
            continue
        for path in candidates:
            if path.name in busy or (kind == "ces" and (path / SUBMITTED_HERE).exists()):
                continue
            try:
                if now - _last_touched(path) < keep_s:
                    continue
                shutil.rmtree(path)
            except FileNotFoundError:
                continue
            except OSError as e:
                log.warning("cannot remove the old copy %s: %s", path, e)
                continue
            removed.append(path)
            log.info("removed %s: untouched for %g days", path, keep_s / 86400)
    return removed
