"""Launch and keep alive the process behind an upstream engine (`vllm serve`, `llama-server`, ...).

The process runs in its own process group, so stopping it also stops the workers it forks (vLLM
spawns an engine-core process per GPU). Its stdout and stderr go to a log file rather than to our
own streams: an inference server writes a lot that would drown the gateway's logs, and the file's
tail is what explains a failed start. If the process dies while we did not ask it to, it is started
again after an exponentially growing pause, a bounded number of times in a row; a process that ran
for `stable_after_s` before dying resets that count, so a crash once a day is never fatal.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import httpx

log = logging.getLogger(__name__)


class UpstreamStartError(RuntimeError):
    """The supervised process exited or never answered while we waited for it."""


async def wait_for_http(url: str, timeout: float, headers: Mapping[str, str] | None = None,
                        check: Callable[[], None] | None = None) -> None:
    """Poll `GET url` until it answers 200, calling `check` (which raises to give up) between
    tries; `UpstreamStartError` at the deadline."""
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(timeout=5.0, headers=headers) as client:
        while True:
            if check is not None:
                check()
            status = None
            with contextlib.suppress(httpx.HTTPError):
                status = (await client.get(url)).status_code
            if status == 200:
                return
            if status in (401, 403):
                # Up, but refusing our key: waiting longer will not change that.
                raise UpstreamStartError(f"{url} rejected the upstream API key ({status})")
            if time.monotonic() >= deadline:
                raise UpstreamStartError(f"{url} did not answer within {timeout:.0f}s")
            await asyncio.sleep(0.25)


class ProcessSupervisor:
    def __init__(
        self,
        command: list[str],
        *,
        log_path: Path,
        max_restarts: int = 5,
        backoff_s: float = 1.0,
        max_backoff_s: float = 60.0,
        stable_after_s: float = 300.0,
        grace_s: float = 15.0,
    ) -> None:
        if not command:
            raise ValueError("empty upstream command")
        self.command = command
        self.log_path = log_path
        self.max_restarts = max_restarts
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.stable_after_s = stable_after_s
        self.grace_s = grace_s
        #: How many times the process has been launched; a readiness check made before the latest
        #: launch says nothing about the process running now.
        self.launches = 0
        self._proc: asyncio.subprocess.Process | None = None
        self._launched_at = 0.0
        self._monitor: asyncio.Task[None] | None = None
        self._stopping = False

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.returncode is None

    async def start(self) -> None:
        self._stopping = False  # started again after a deliberate `stop` (a maintenance window)
        await self._launch()
        self._monitor = asyncio.create_task(self._watch(), name="upstream-supervisor")

    async def _launch(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as out:
            out.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} launch: "
                      f"{' '.join(self.command)}\n".encode())
            out.flush()
            # The child holds its own copy of the descriptor, so ours can close right away.
            self._proc = await asyncio.create_subprocess_exec(
                *self.command, stdin=asyncio.subprocess.DEVNULL, stdout=out,
                stderr=asyncio.subprocess.STDOUT, start_new_session=True,
            )
        self.launches += 1
        self._launched_at = time.monotonic()
        log.info("upstream launched (pid %d), log: %s", self._proc.pid, self.log_path)

    async def _watch(self) -> None:
        failures = 0
        while True:
            assert self._proc is not None
            code = await self._proc.wait()
            if self._stopping:
                return
            ran_s = time.monotonic() - self._launched_at
            failures = 1 if ran_s >= self.stable_after_s else failures + 1
            if failures > self.max_restarts:
                log.error("upstream exited (code %s) %d times in a row; giving up. Log tail:\n%s",
                          code, failures, self.log_tail())
                return
            delay = min(self.backoff_s * 2 ** (failures - 1), self.max_backoff_s)
            log.warning("upstream exited (code %s) after %.1fs; restart %d/%d in %.1fs",
                        code, ran_s, failures, self.max_restarts, delay)
            await asyncio.sleep(delay)
            if self._stopping:
                return
            # Leftover workers of the dead leader may still hold the GPU or the port.
            self._signal_group(signal.SIGKILL)
            try:
                await self._launch()
            except OSError:
                log.exception("upstream relaunch failed; giving up")
                return

    async def wait_ready(self, url: str, timeout: float,
                         headers: Mapping[str, str] | None = None) -> None:
        """Poll `GET url` until it answers 200; fail at once if the process exits meanwhile."""
        await wait_for_http(url, timeout, headers, check=self._check_running)

    def _check_running(self) -> None:
        if not self.alive:
            # The first line says why (the process's last words); the tail follows for the log.
            tail = self.log_tail()
            last = next((line.strip() for line in reversed(tail.splitlines()) if line.strip()),
                        "no output")
            raise UpstreamStartError(
                f"upstream exited with code {self._proc and self._proc.returncode} before "
                f"answering: {last} (log: {self.log_path})\n{tail}"
            )

    def log_tail(self, max_bytes: int = 4000) -> str:
        try:
            with self.log_path.open("rb") as f:
                f.seek(max(0, f.seek(0, os.SEEK_END) - max_bytes))
                return f.read().decode("utf-8", "replace")
        except OSError:
            return "(no log)"

    def _signal_group(self, sig: signal.Signals) -> None:
        if self._proc is None:
            return
        # The group id is the leader's pid (start_new_session); it outlives a dead leader as long
        # as any member lives.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self._proc.pid, sig)

    async def stop(self) -> None:
        """SIGTERM the process group, SIGKILL it after `grace_s`; no restart afterwards."""
        self._stopping = True
        if self._monitor is not None:
            self._monitor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._monitor
        if self._proc is None:
            return
        self._signal_group(signal.SIGTERM)
        try:
            await asyncio.wait_for(self._proc.wait(), self.grace_s)
        except TimeoutError:
            log.warning("upstream ignored SIGTERM for %.0fs; killing it", self.grace_s)
        # Also kills workers that outlived a leader which exited on SIGTERM.
        self._signal_group(signal.SIGKILL)
        await self._proc.wait()
        # A worker's GPU memory is freed only once it has exited, and a maintenance window
        # trains right after this returns: wait (bounded) until no member still runs.
        deadline = time.monotonic() + self.grace_s
        while _group_running(self._proc.pid) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)


def _group_running(pgid: int) -> bool:
    """Whether a process of the group `pgid` is still running (a zombie, which holds no memory
    and waits for whoever reaps it, does not count). Linux's /proc; elsewhere, never."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # gone meanwhile
        # After the command name: state, ppid, pgrp.
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            return True
    return False
