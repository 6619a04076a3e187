"""Results written in rounds while a job runs end up exactly as one export at the end would write them."""

from __future__ import annotations

import json
import os
from pathlib import Path

from bonjourgrid.jobs import _export
from bonjourgrid.journal import Journal, ResultRecord


def tree(root: Path) -> dict[str, object]:
    files: dict[str, object] = {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}
    summary = json.loads(files.pop("summary.json"))  # type: ignore[arg-type]
    assert summary.pop("results_dir") == str(root)
    return {**files, "summary.json": summary}


def test_rounds_while_running_then_the_rest_equal_one_export(tmp_path: Path) -> None:
    j = Journal.open(tmp_path / "journal.db")
    j.create_job("j", {"name": "sweep"}, [{"argv": ["echo", str(i)]} for i in range(12)], submitter="n",
                 created_at=1.0)
    j.mark_running_many("j", list(range(12)), "w1", 2.0)
    status = {"job": "j", "state": "running"}
    streamed, mark = tmp_path / "streamed", 0
    written: list[set[str]] = []
    for batch in (range(0, 4), range(4, 9)):
        j.record_results("j", [(i, ResultRecord(0, 2.0, 3.0, "w1", 1, stdout=b"%d\n" % i)) for i in batch])
        before = set(os.listdir(streamed)) if streamed.exists() else set()
        mark = _export(j, tmp_path, "j", streamed, status, mark, final=False)["mark"]
        written.append(set(os.listdir(streamed)) - before)
        assert not (streamed / "summary.json").exists()
    assert written == [{"00", "01", "02", "03"}, {"04", "05", "06", "07", "08"}]  # each task once, when done
    j.record_results("j", [(i, ResultRecord(0, 2.0, 3.0, "w1", 1, stdout=b"%d\n" % i)) for i in (9, 11)])
    for _ in range(3):
        j.record_failure("j", 10, ResultRecord(1, 2.0, 3.0, "w1", 1, stderr=b"boom\n"), max_failures=1)
    j.set_job_state("j", "done", 4.0)
    done = {"job": "j", "state": "done"}
    _export(j, tmp_path, "j", streamed, done, mark)
    _export(j, tmp_path, "j", tmp_path / "once", done)
    assert tree(streamed) == tree(tmp_path / "once")
    assert (streamed / "10" / "stderr").read_bytes() == b"boom\n"
    assert (streamed / "11" / "stdout").read_bytes() == b"11\n"
    j.close()
