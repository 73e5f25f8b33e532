"""The slot pool: the server's N_PARALLEL slots (engine views, engine.EngineSlot), lent one request at a time in
arrival order; at most `max_queue` requests wait."""
from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from typing import Any, Sequence


class QueueFull(Exception):
    def __init__(self, retry_after_s: int) -> None:
        super().__init__(f"queue full; retry after {retry_after_s} s")
        self.retry_after_s = retry_after_s


class SlotPool:
    """N slots, lent one request at a time, first come first served; at most `max_queue` requests wait.

    Used from the event loop only (not thread-safe); the slot itself serves in a worker thread.
    """

    def __init__(self, slots: Sequence[Any], max_queue: int) -> None:
        self.slots = list(slots)
        self.max_queue = max_queue
        self._free: deque[Any] = deque(self.slots)
        self._waiters: deque[asyncio.Future] = deque()
        self._lent_at: dict[int, float] = {}
        self._hold_s = 1.0  # moving average of how long a request holds a slot, for Retry-After

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    @property
    def busy(self) -> int:
        return len(self.slots) - len(self._free)

    def check_room(self) -> None:
        """QueueFull unless a request arriving now would get a slot or a place in the queue."""
        if not (self._free and not self._waiters) and len(self._waiters) >= self.max_queue:
            raise QueueFull(self.retry_after_s())

    async def acquire(self) -> Any:
        if self._free and not self._waiters:
            return self._lend(self._free.popleft())
        self.check_room()
        fut = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            return self._lend(await fut)
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():  # handed a slot just as the wait was cancelled
                self.release(fut.result())
            elif fut in self._waiters:
                self._waiters.remove(fut)
            raise

    def release(self, slot: Any) -> None:
        if (lent := self._lent_at.pop(id(slot), None)) is not None:
            self._hold_s = 0.8 * self._hold_s + 0.2 * (time.monotonic() - lent)
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(slot)
                return
        self._free.append(slot)

    def retry_after_s(self) -> int:
        return max(1, min(600, math.ceil(self._hold_s * (self.waiting + 1) / len(self.slots))))

    def _lend(self, slot: Any) -> Any:
        self._lent_at[id(slot)] = time.monotonic()
        return slot
