"""Bounded admission: at most `max_running` requests generate, at most `max_waiting` wait for a
slot; beyond that a request is refused at once with 429 and `retry-after` rather than queued
without bound."""

from __future__ import annotations

import asyncio

from clinicloop.serving.errors import OpenAIError


class Admission:
    def __init__(self, max_running: int, max_waiting: int) -> None:
        self.max_running = max_running
        self.max_waiting = max_waiting
        self._slots = asyncio.Semaphore(max_running)
        self.running = 0
        self.waiting = 0

    async def acquire(self) -> None:
        if self.running >= self.max_running and self.waiting >= self.max_waiting:
            raise OpenAIError(
                429, "the server is at capacity; retry shortly", code="server_busy",
                headers={"retry-after": "1"},
            )
        self.waiting += 1
        try:
            await self._slots.acquire()
        finally:
            self.waiting -= 1
        self.running += 1

    def release(self) -> None:
        self.running -= 1
        self._slots.release()
