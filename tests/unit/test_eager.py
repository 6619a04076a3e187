"""eager.start: a coroutine's first part runs at once, the rest as a task, with a task's semantics."""

from __future__ import annotations

import asyncio

import pytest

from bonjourgrid import eager


def run(coro):
    return asyncio.run(coro)


def test_a_coroutine_that_never_waits_runs_to_its_end_at_once() -> None:
    seen = []

    async def handler() -> None:
        seen.append("ran")

    async def main() -> None:
        assert eager.start(handler()) is None
        assert seen == ["ran"]  # before the loop turned

    run(main())


def test_the_rest_runs_as_a_task_and_gets_what_it_waited_for() -> None:
    seen = []

    async def handler(fut: asyncio.Future[int], sleeper: float) -> None:
        seen.append("before")
        seen.append(await fut)
        await asyncio.sleep(0)
        await asyncio.sleep(sleeper)
        seen.append(await asyncio.to_thread(lambda: "thread"))
        seen.append(await asyncio.ensure_future(asyncio.sleep(0, "task")))

    async def main() -> None:
        fut = asyncio.get_running_loop().create_future()
        task = eager.start(handler(fut, 0.01))
        assert task is not None and seen == ["before"]
        fut.set_result(7)
        await task
        assert seen == ["before", 7, "thread", "task"]

    run(main())


def test_an_exception_reaches_the_coroutine_where_it_waits() -> None:
    seen = []

    async def handler(fut: asyncio.Future[int]) -> None:
        try:
            await fut
        except KeyError as e:
            seen.append(e.args)

    async def main() -> None:
        fut = asyncio.get_running_loop().create_future()
        task = eager.start(handler(fut))
        assert task is not None
        fut.set_exception(KeyError("x"))
        await task
        assert seen == [("x",)]

    run(main())


def test_an_exception_before_the_first_wait_is_the_callers() -> None:
    async def handler() -> None:
        raise ValueError("bad")

    async def main() -> None:
        with pytest.raises(ValueError, match="bad"):
            eager.start(handler())

    run(main())


def test_an_unhandled_exception_after_a_wait_ends_the_task_with_it() -> None:
    async def handler() -> None:
        await asyncio.sleep(0)
        raise ValueError("later")

    async def main() -> None:
        task = eager.start(handler())
        assert task is not None
        with pytest.raises(ValueError, match="later"):
            await task

    run(main())


def test_cancelling_the_task_cancels_what_the_coroutine_waits_on_and_it_sees_it() -> None:
    seen = []

    async def handler(fut: asyncio.Future[int]) -> None:
        try:
            await fut
        except asyncio.CancelledError:
            seen.append("cancelled")
            raise

    async def main() -> None:
        fut = asyncio.get_running_loop().create_future()
        task = eager.start(handler(fut))
        assert task is not None
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert fut.cancelled() and seen == ["cancelled"]

    run(main())


def test_a_cancellation_that_comes_as_the_future_completes_still_reaches_the_coroutine() -> None:
    seen = []

    async def handler(fut: asyncio.Future[int]) -> None:
        try:
            await fut
            seen.append("resumed")
        except asyncio.CancelledError:
            seen.append("cancelled")
            raise

    async def main() -> None:
        fut = asyncio.get_running_loop().create_future()
        task = eager.start(handler(fut))
        assert task is not None
        await asyncio.sleep(0)
        fut.set_result(1)  # done, its callback (waking the task) not yet run
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert seen == ["cancelled"]

    run(main())


def test_several_coroutines_can_wait_on_the_same_future() -> None:
    """As tasks can: a worker's first tasks all wait for its spawner's connection."""
    seen = []

    async def connect() -> str:
        await asyncio.sleep(0.01)
        return "ready"

    async def user(ready: asyncio.Task[str], i: int) -> None:
        seen.append((i, await ready))

    async def main() -> None:
        ready = asyncio.get_running_loop().create_task(connect())
        tasks = [eager.start(user(ready, i)) for i in range(3)]
        await asyncio.gather(*[t for t in tasks if t is not None])
        assert sorted(seen) == [(0, "ready"), (1, "ready"), (2, "ready")]

    run(main())
