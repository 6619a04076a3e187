"""The native worker half: whatever goes wrong with an attempt on this node, the task comes back as
a result (failed, with the reason), never disappears with its slot."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path
from types import SimpleNamespace

import pytest

from bonjourgrid.datasrv import DataError, upload
from bonjourgrid.execution import Executor, TaskOutcome
from bonjourgrid.gridkey import GridKey
from bonjourgrid.native import AHEAD_INPUT_BYTES, AHEAD_PER_SLOT, NativeWorker
from bonjourgrid.sandbox import OutputFile, SandboxPool


class _WorkerCE:
    """The parts of a WorkerCE the worker half reads."""

    def __init__(self, root: Path, executor: Executor) -> None:
        self.dir, self.ce, self.slots, self.config = root, "ce-unit", 1, {}
        self.key, self.data_url = GridKey.generate(), None
        self.daemon = SimpleNamespace(task_executor=lambda: executor)


@pytest.fixture
def executor():
    ex = Executor()
    yield ex
    ex.close()


def _take_one(half: NativeWorker, index: int) -> dict:
    """What `on_message` does with a task before it goes in the backlog."""
    half.in_hand += 1
    half.running_now.add(index)
    return {"index": index, "attempt": 1, "argv": ["true"], "env": {}}


async def _run_through_the_backlog(half: NativeWorker, index: int) -> None:
    """As `on_message` runs a task: into the backlog, then started on a free slot; to its end."""
    half.backlog.append(_take_one(half, index))
    half._start_backlog()
    while half._running:
        await asyncio.gather(*half._running)


def test_a_sandbox_that_cannot_be_made_fails_the_attempt_and_frees_the_slot(tmp_path, executor):
    async def main():
        worker = _WorkerCE(tmp_path / "ce", executor)
        worker.dir.mkdir()
        (worker.dir / "tasks").write_text("not a directory")  # every sandbox's mkdir fails, even as root
        half = NativeWorker(worker)
        half._inputs_ready = asyncio.ensure_future(asyncio.sleep(0, result=worker.dir / "inputs"))
        await _run_through_the_backlog(half, 7)
        return half

    half = asyncio.run(main())
    [result] = half._results
    assert (result["index"], result["ok"]) == (7, False)
    assert "could not make the task's sandbox" in result["error"]
    assert half.unacked == {(7, 1): result}  # sent, and resent until acknowledged
    assert half.in_hand == 0 and not half.running_now
    assert half._free_slots == AHEAD_PER_SLOT  # the slot (and the tasks ahead of it) are free again


def test_an_output_gone_before_it_is_sent_fails_the_attempt_clearly(tmp_path, executor):
    async def main():
        half = NativeWorker(_WorkerCE(tmp_path, executor))
        gone = OutputFile(path="out/result.txt", size=3, sha256=hashlib.sha256(b"abc").hexdigest())
        outcome = TaskOutcome(0, b"done\n", b"", False, False, 1.0, 2.0, False, False, (gone,), None)
        return await half._result(3, 1, tmp_path, outcome)

    result = asyncio.run(main())
    assert result["ok"] is False
    assert "could not read output out/result.txt" in result["error"]
    assert result["stdout"]  # what the task printed still comes back


def test_uploading_a_file_that_is_gone_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match=r"cannot upload big\.bin"):
        upload("http://127.0.0.1:9", GridKey.generate(), "ce", 0, 1, "big.bin", tmp_path / "big.bin", "0" * 64)


def test_reserved_sandboxes_are_ready_with_their_tmp_and_taken_before_new_ones(tmp_path):
    pool = SandboxPool(tmp_path / "tasks")
    pool.reserve(2)
    made = sorted(p.name for p in (tmp_path / "tasks").iterdir())
    assert made == ["slot-1", "slot-2"]
    assert all((tmp_path / "tasks" / m / "tmp").is_dir() for m in made)
    first, second, third = pool.take(), pool.take(), pool.take()
    assert {first.name, second.name} == {"slot-1", "slot-2"} and third.name == "slot-3"
    (first / "left-over").write_text("x")
    pool.give_back(first)
    assert pool.take() == first and list(first.iterdir()) == [first / "tmp"]  # emptied, tmp/ kept
    pool.reserve(2)  # enough made already: nothing new
    assert len(list((tmp_path / "tasks").iterdir())) == 3


def test_an_unexpected_error_in_the_worker_fails_the_attempt_and_frees_the_slot(tmp_path, executor, monkeypatch,
                                                                                caplog):
    async def broken_run(run):
        raise RuntimeError("a bug")

    async def main():
        worker = _WorkerCE(tmp_path, executor)
        half = NativeWorker(worker)
        half._inputs_ready = asyncio.ensure_future(asyncio.sleep(0, result=tmp_path / "inputs"))
        monkeypatch.setattr(executor, "run", broken_run)
        await _run_through_the_backlog(half, 4)
        return half

    half = asyncio.run(main())
    [result] = half._results
    assert result["ok"] is False and "RuntimeError('a bug')" in result["error"]
    assert half.in_hand == 0 and half._free_slots == AHEAD_PER_SLOT
    assert (tmp_path / "tasks" / "slot-1").is_dir() and half.sandboxes.take().name == "slot-1"  # given back
    assert "the worker failed" in caplog.text


def test_tasks_wait_in_the_spawner_several_per_slot_unless_each_would_copy_big_inputs() -> None:
    assert NativeWorker._per_slot({}) == AHEAD_PER_SLOT
    small = [{"dest": "a", "sha256": "0" * 64, "size": 1 << 20}]
    assert NativeWorker._per_slot({"inputs": small}) == AHEAD_PER_SLOT
    big = [{"dest": "a", "sha256": "0" * 64, "size": AHEAD_INPUT_BYTES // 2}]
    assert NativeWorker._per_slot({"inputs": big}) == 2  # the running task and one ahead
    assert NativeWorker._per_slot({"runtime": "docker"}) == 1  # containers start on a free slot only


def test_no_task_starts_once_the_ce_is_over(tmp_path, executor):
    """A task that ends frees its slot and starts the next of the backlog: not after the CE ended."""
    async def main():
        half = NativeWorker(_WorkerCE(tmp_path, executor))

        async def no_pull() -> None:
            pass

        half._pull = no_pull  # type: ignore[method-assign]
        half._free_slots = 0  # every slot busy: what comes waits in the backlog
        half.backlog.extend(_take_one(half, i) for i in range(3))
        run = asyncio.ensure_future(half.run())
        await asyncio.sleep(0.05)
        run.cancel()
        with pytest.raises(asyncio.CancelledError):
            await run
        half._free_slots = 1  # the busy slot frees now, as a task's end does
        half._start_backlog()
        started = set(half._running)
        for t in started:
            t.cancel()
        await asyncio.gather(*started, return_exceptions=True)
        executor.close()  # its spawner, on this event loop
        return half, started

    half, started = asyncio.run(main())
    assert not started and not half.backlog
