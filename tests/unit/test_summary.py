"""summary.json: the same document as plain JSON, one task per line."""

from __future__ import annotations

import json

from bonjourgrid.summary import summary_text


def test_the_summary_reads_back_as_the_same_document_with_one_task_per_line() -> None:
    tasks = [{"index": i, "state": "done", "argv": ["echo", f"hi {i}", 'a "quoted", odd\nline'], "outputs": [],
              "exit_code": 0, "seconds": 0.001} for i in range(3)]
    summary = {"job": "j-1", "state": "done", "tasks_total": 3, "message": None, "tasks": tasks}
    text = summary_text(summary)
    assert json.loads(text) == summary
    lines = text.splitlines()
    assert [json.loads(line.strip().rstrip(",")) for line in lines[6:9]] == tasks
    assert lines[0] == "{" and lines[-1] == "}" and text.endswith("\n")


def test_a_summary_without_tasks_or_with_none_is_valid_json() -> None:
    for summary in ({"job": "j", "tasks": []}, {"job": "j"}, {"tasks": []}):
        assert json.loads(summary_text(summary)) == summary
