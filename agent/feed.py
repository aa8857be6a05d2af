"""A subscriber's queue that never makes its producer wait (monitor lines, tap records).

Producers offer from places that must not block or fail (inside a logging
call, on the proxy's path), so what does not fit is dropped and counted, and
the reader learns how many were skipped exactly where the gap is: each item
travels with the number dropped just before it.
"""

from __future__ import annotations

from typing import Generic, TypeVar

import trio

T = TypeVar("T")


class LossyFeed(Generic[T]):
    def __init__(self, buffer: int) -> None:
        #: Items dropped since the start.
        self.dropped = 0
        self._missed = 0  # dropped since the last item that got through
        self._send, self._receive = trio.open_memory_channel[tuple[int, T]](buffer)

    def offer(self, item: T) -> None:
        try:
            self._send.send_nowait((self._missed, item))
        except trio.WouldBlock:
            self._missed += 1
            self.dropped += 1
        else:
            self._missed = 0

    def close(self) -> None:
        self._send.close()

    async def next_item(self) -> tuple[int, T]:
        """The next item and how many were dropped just before it; StopAsyncIteration once closed."""
        try:
            return await self._receive.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            raise StopAsyncIteration from None
