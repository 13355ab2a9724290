"""unless_disconnected: the work's result, a 499 when the client leaves first, and a cancel from
elsewhere (a shutdown) left a cancel."""

import asyncio
from typing import Any

import pytest

from app.api.deps import unless_disconnected
from app.api.errors import APIError


class Client:
    """What the route's Request gives unless_disconnected: receive(), which answers
    http.disconnect once the client has left."""

    def __init__(self) -> None:
        self.left = asyncio.Event()

    async def receive(self) -> dict[str, Any]:
        await self.left.wait()
        return {"type": "http.disconnect"}


async def work(ended: list[str], seconds: float) -> str:
    try:
        await asyncio.sleep(seconds)
    except asyncio.CancelledError:
        ended.append("cancelled")
        raise
    ended.append("done")
    return "result"


def test_the_work_gives_its_result_and_leaves_no_watcher_behind() -> None:
    async def main() -> None:
        ended: list[str] = []
        before = len(asyncio.all_tasks())
        assert await unless_disconnected(Client(), work(ended, 0.01)) == "result"  # type: ignore[arg-type]
        await asyncio.sleep(0)  # the watcher's cancel takes effect
        assert ended == ["done"] and len(asyncio.all_tasks()) == before

    asyncio.run(main())


def test_a_client_that_leaves_first_cancels_the_work_and_gets_499() -> None:
    async def main() -> None:
        ended: list[str] = []
        client = Client()
        asyncio.get_running_loop().call_later(0.05, client.left.set)
        with pytest.raises(APIError) as err:
            await unless_disconnected(client, work(ended, 10))  # type: ignore[arg-type]
        assert err.value.status == 499 and ended == ["cancelled"]
        current = asyncio.current_task()
        assert current is not None and current.cancelling() == 0  # the caller is not left cancelled
        await asyncio.sleep(0.01)  # and goes on awaiting normally

    asyncio.run(main())


def test_a_cancel_from_elsewhere_stays_a_cancel() -> None:
    async def main() -> None:
        ended: list[str] = []
        task = asyncio.ensure_future(unless_disconnected(Client(), work(ended, 10)))  # type: ignore[arg-type]
        await asyncio.sleep(0.05)
        task.cancel()  # a shutdown, say: not the client leaving
        with pytest.raises(asyncio.CancelledError):
            await task
        assert ended == ["cancelled"]

    asyncio.run(main())


def test_a_broken_receive_counts_as_the_client_gone() -> None:
    class Broken:
        async def receive(self) -> dict[str, Any]:
            await asyncio.sleep(0.05)
            raise RuntimeError("connection lost")

    async def main() -> None:
        ended: list[str] = []
        with pytest.raises(APIError) as err:
            await unless_disconnected(Broken(), work(ended, 10))  # type: ignore[arg-type]
        assert err.value.status == 499 and ended == ["cancelled"]

    asyncio.run(main())
