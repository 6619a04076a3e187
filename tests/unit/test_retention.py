"""Other jobs' leftovers leave a lent desktop once untouched long enough; the owner's jobs never do."""

from __future__ import annotations

import os
from pathlib import Path

from bonjourgrid.retention import SUBMITTED_HERE, prune

DAY = 86400.0
NOW = 1_800_000_000.0


def make(state: Path, kind: str, name: str, age_days: float, *files: str) -> Path:
    d = state / kind / name
    d.mkdir(parents=True)
    for f in ("journal.db", *files):
        (d / f).write_text("x")
    when = NOW - age_days * DAY
    for p in (*d.iterdir(), d):
        os.utime(p, (when, when))
    return d


def test_old_leftovers_of_other_jobs_go_and_everything_else_stays(tmp_path: Path) -> None:
    old_copy = make(tmp_path, "ces", "copy-old", 8, "inputs.json", "left.json")
    old_export = make(tmp_path, "exports", "export-old", 9)
    old_work = make(tmp_path, "work", "work-old", 30)
    kept = [
        make(tmp_path, "ces", "copy-recent", 2, "inputs.json"),
        make(tmp_path, "ces", "mine-old", 400, SUBMITTED_HERE, "status.json"),  # submitted here: the owner's
        make(tmp_path, "ces", "busy-old", 50),  # a CE this node is in right now
        make(tmp_path, "work", "busy-old", 50),
    ]
    still_written = make(tmp_path, "ces", "copy-wal", 20)
    os.utime(still_written / "journal.db", (NOW - 60, NOW - 60))  # its newest file counts, not the directory

    removed = prune(tmp_path, {"busy-old"}, 7 * DAY, NOW)

    assert sorted(removed) == sorted([old_copy, old_export, old_work])
    assert not any(p.exists() for p in removed)
    assert all(p.is_dir() for p in [*kept, still_written])


def test_nothing_to_clean_and_unremovable_directories_are_not_errors(tmp_path: Path) -> None:
    assert prune(tmp_path / "no-state-yet", set(), DAY, NOW) == []
    stuck = make(tmp_path, "exports", "stuck", 10)
    os.chmod(tmp_path / "exports", 0o500)  # cannot unlink entries (root ignores this)
    try:
        removed = prune(tmp_path, set(), DAY, NOW)
    finally:
        os.chmod(tmp_path / "exports", 0o700)
    assert removed == ([] if stuck.exists() else [stuck])
