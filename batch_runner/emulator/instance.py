"""Starting, crashing and restarting an emulated server."""

from __future__ import annotations

import asyncio
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType

from aiohttp import web

from batch_runner.emulator.config import EmulatorConfig
from batch_runner.emulator.executor import Executor
from batch_runner.emulator.faults import Dice
from batch_runner.emulator.files import Folders
from batch_runner.emulator.hub import Hub
from batch_runner.emulator.server import State, build_app

# Exit status of a standalone emulator ended by the crash_after_prompts fault.
CRASH_EXIT_STATUS = 75


class Emulator:
    """An emulated ComfyUI server on a loopback port, as an async context manager.

    `restart()` behaves like restarting the real process (sockets dropped, queue, history,
    number counter and node cache emptied, files kept, same port); `crash()` is a hard stop
    that refuses HTTP until `restart()`.
    """

    def __init__(self, config: EmulatorConfig | None = None) -> None:
        self.config = config or EmulatorConfig()
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._runner: web.AppRunner | None = None
        self._port = self.config.port
        self._state: State | None = None
        self._crash_task: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        return f"http://{self.config.host}:{self._port}"

    @property
    def data_dir(self) -> Path:
        return self._require().folders.root

    @property
    def executions(self) -> Mapping[str, int]:
        """prompt_id -> how many times the worker executed it (cached runs included)."""
        return self._require().executor.executions

    @property
    def switch_gaps_ms(self) -> list[float]:
        """Time between one prompt finishing and the next starting on the worker."""
        return list(self._require().executor.switch_gaps_ms)

    @property
    def running(self) -> bool:
        return self._runner is not None

    def _require(self) -> State:
        if self._state is None:
            raise RuntimeError("the emulator has not been started")
        return self._state

    async def __aenter__(self) -> Emulator:
        root = self.config.data_dir
        if root is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="comfy-emulator-")
            root = Path(self._tmp.name)
        dice = Dice(self.config.faults)
        folders = Folders(Path(root))
        hub = Hub(self.config.faults, dice)
        executor = Executor(self.config, folders, hub, dice, self._crash_fault)
        self._state = State(self.config, folders, hub, executor, dice)
        await self._start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._crash_task is not None:
            await asyncio.gather(self._crash_task, return_exceptions=True)
        await self._stop()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    async def _start(self) -> None:
        state = self._require()
        state.hub.start()
        state.executor.start()
        runner = web.AppRunner(build_app(state), access_log=None, shutdown_timeout=0.5)
        await runner.setup()
        site = web.TCPSite(runner, self.config.host, self._port)
        await site.start()
        self._port = int(runner.addresses[0][1])
        self._runner = runner

    async def _stop(self) -> None:
        state = self._require()
        await state.executor.stop()
        await state.hub.stop()
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()

    async def crash(self) -> None:
        """Hard stop: sockets dropped without close frames, HTTP refused until restart()."""
        await self._stop()

    async def restart(self, *, forget: bool = True) -> None:
        """Come back on the same port; with forget, in-memory state is gone as after a real
        restart. Without it, queue, history, counter and cache are kept (a network blip)."""
        await self._stop()
        if forget:
            self._require().executor.forget()
        await self._start()

    def _crash_fault(self) -> None:
        if self.config.exit_on_crash:
            os._exit(CRASH_EXIT_STATUS)
        self._crash_task = asyncio.create_task(self.crash(), name="emulator-crash")


async def serve(config: EmulatorConfig, *, ready: Callable[[str], None] | None = None) -> None:
    """Run an emulator until cancelled; `ready(url)` is called once it listens."""
    async with Emulator(config) as emulator:
        if ready is not None:
            ready(emulator.url)
        await asyncio.Event().wait()
