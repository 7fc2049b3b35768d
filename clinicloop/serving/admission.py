"""Bounded admission: at most `max_running` requests generate, at most `max_waiting` wait for a
slot; beyond that a request is refused at once with 429 and `retry-after` rather than queued
without bound. `running` and `waiting` are what `vllm:num_requests_running|waiting` export: with
`server.max_running` at its default (the engine's own limit) a running request holds an engine
sequence and a waiting one is queued for it, as vLLM's scheduler counts them."""

from __future__ import annotations

import asyncio
import time

from clinicloop.serving.errors import OpenAIError


class Admission:
    def __init__(self, max_running: int, max_waiting: int) -> None:
        self.max_running = max_running
        self.max_waiting = max_waiting
        self._slots = asyncio.Semaphore(max_running)
        self.running = 0
        self.waiting = 0

    async def acquire(self) -> float:
        """Wait for a slot; return the seconds waited (`vllm:request_queue_time_seconds`)."""
        if self.running >= self.max_running and self.waiting >= self.max_waiting:
            raise OpenAIError(
                429, "the server is at capacity; retry shortly", code="server_busy",
                headers={"retry-after": "1"},
            )
        queued = time.perf_counter()
        self.waiting += 1
        try:
            await self._slots.acquire()
        finally:
            self.waiting -= 1
        self.running += 1
        return time.perf_counter() - queued

    def release(self) -> None:
        self.running -= 1
        self._slots.release()
