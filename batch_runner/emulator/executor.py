"""The queue, the single worker, the node cache and the history of one emulated server."""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import time
import traceback
from collections import Counter, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from batch_runner.emulator import graph, nodes
from batch_runner.emulator.config import EmulatorConfig
from batch_runner.emulator.faults import Dice
from batch_runner.emulator.files import Folders, UnsafePath
from batch_runner.emulator.hub import Hub, Preview
from batch_runner.emulator.video import VideoWriter

JsonDict = dict[str, Any]

# Switch gaps kept for /emulator/stats; old ones are dropped to bound memory.
_GAPS_KEPT = 100_000


class OutOfMemoryError(RuntimeError):
    """Reported as torch.OutOfMemoryError, as a CUDA out-of-memory failure is."""

    __module__ = "torch"


OOM_MESSAGE = (
    "CUDA out of memory. Tried to allocate 1.24 GiB. GPU 0 has a total capacity of 79.19 GiB "
    "of which 612.00 MiB is free. Process 1 has 78.58 GiB memory in use. Of the allocated "
    "memory 76.12 GiB is allocated by PyTorch, and 1.86 GiB is reserved by PyTorch but "
    "unallocated. If reserved but unallocated memory is large try setting "
    "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True to avoid fragmentation.  See "
    "documentation for Memory Management  "
    "(https://pytorch.org/docs/stable/notes/cuda.html#environment-variables)"
)


#: Time owed by earlier prompts (see ``Executor._owed_s``) is made up at most this many steps
#: per prompt (up to half a step, the first step still waits: no burst), and at most this many
#: steps of it are kept.
PAYBACK_STEPS = 0.5
OWED_STEPS_KEPT = 10


def gpu_clock() -> float:
    """The clock emulated GPU time is counted on (tests replace it)."""
    return time.monotonic()


def now_ms() -> int:
    return int(time.time() * 1000)


def type_name(exc: BaseException) -> str:
    kind = type(exc)
    if kind.__module__ == "builtins":
        return kind.__qualname__
    return f"{kind.__module__}.{kind.__qualname__}"


@dataclass
class Task:
    number: int | float
    prompt_id: str
    prompt: graph.Prompt
    extra_data: JsonDict
    outputs: list[str]

    @property
    def client_id(self) -> str | None:
        found = self.extra_data.get("client_id")
        return None if found is None else str(found)

    def item(self) -> list[Any]:
        return [self.number, self.prompt_id, self.prompt, self.extra_data, self.outputs]


@dataclass
class _Cached:
    signature: str
    outputs: nodes.Outputs
    ui: nodes.UI | None


class _Interrupted(Exception):
    def __init__(self, node_id: str) -> None:
        super().__init__(node_id)
        self.node_id = node_id


class _NodeFailed(Exception):
    def __init__(self, node_id: str, error: Exception, inputs: Mapping[str, Any]) -> None:
        super().__init__(node_id)
        self.node_id = node_id
        self.error = error
        self.inputs = inputs


@dataclass
class _Run:
    """The state of the prompt being executed."""

    task: Task
    progress: dict[str, JsonDict] = field(default_factory=dict)
    messages: list[list[Any]] = field(default_factory=list)
    #: When the emulated GPU is done with the steps taken so far (on ``gpu_clock``), counted
    #: from the prompt's start. Steps wait for this deadline rather than sleeping a step each, so
    #: the emulator's own work between steps (messages, previews, competing for a shared
    #: CPU) is not added to the GPU time it promises.
    gpu_deadline: float = field(default_factory=lambda: gpu_clock())
    #: Steps that waited for emulated GPU time.
    steps: int = 0


class Executor:
    def __init__(
        self,
        config: EmulatorConfig,
        folders: Folders,
        hub: Hub,
        dice: Dice,
        on_crash: Callable[[], None],
    ) -> None:
        self.config = config
        self.folders = folders
        self.hub = hub
        self.dice = dice
        self.writer = VideoWriter()
        self.models = config.model_files
        self.video_max_side = config.video_max_side
        self._on_crash = on_crash
        #: How much longer than their steps × step time the prompts before took from start to
        #: success: the emulator's own work after the last step (writing the video, the last
        #: messages) and stalls of the host it shares with other processes. The next prompts
        #: make it up, so a server's busy time over a run is its steps × step time, as promised.
        self._owed_s = 0.0
        # Emulator-level statistics: they survive restarts, so duplicates across crashes show.
        self.executions: Counter[str] = Counter()
        self.switch_gaps_ms: deque[float] = deque(maxlen=_GAPS_KEPT)
        self._last_finish: float | None = None
        self._seq = itertools.count()
        self._task: asyncio.Task[None] | None = None
        self.forget()

    def forget(self) -> None:
        """What a process restart loses: queue, history, number counter, node cache."""
        self.pending: list[tuple[float, int, Task]] = []
        self.history: dict[str, JsonDict] = {}
        self.number = 0
        self.cache: dict[str, _Cached] = {}
        self.running: Task | None = None
        self.current_node: str | None = None
        self._free_requested = False
        self._finished_since_start = 0
        self._last_finish = None
        self._wake = asyncio.Event()
        self._interrupt = asyncio.Event()
        self.folders.forget_counters()

    # ----- lifecycle -------------------------------------------------------------------

    def start(self) -> None:
        self._finished_since_start = 0
        self._task = asyncio.create_task(self._work(), name="emulator-worker")

    async def stop(self) -> None:
        """Stop the worker at once; a running prompt is lost without a history entry."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        self.running = None
        self.current_node = None

    # ----- queue -----------------------------------------------------------------------

    def queue_remaining(self) -> int:
        return len(self.pending) + (1 if self.running is not None else 0)

    def status(self) -> JsonDict:
        return {"status": {"exec_info": {"queue_remaining": self.queue_remaining()}}}

    def broadcast_status(self) -> None:
        self.hub.send("status", self.status(), None)

    def take_number(self, body: Mapping[str, Any]) -> int | float:
        if "number" in body:
            return float(body["number"])
        number: int = self.number
        self.number += 1
        return -number if body.get("front") else number

    def submit(self, task: Task) -> None:
        heapq.heappush(self.pending, (task.number, next(self._seq), task))
        self.broadcast_status()
        self._wake.set()

    def queue_items(self) -> tuple[list[list[Any]], list[list[Any]]]:
        running = [] if self.running is None else [self.running.item()]
        return running, [task.item() for _, _, task in self.pending]

    def delete(self, prompt_ids: Sequence[Any]) -> None:
        for prompt_id in prompt_ids:
            for index, (_, _, task) in enumerate(self.pending):
                if task.prompt_id == prompt_id:
                    self.pending.pop(index)
                    heapq.heapify(self.pending)
                    self.broadcast_status()
                    break

    def clear(self) -> None:
        self.pending.clear()
        self.broadcast_status()

    def interrupt(self, prompt_id: str | None) -> None:
        if self.running is None:
            return
        if prompt_id is None or prompt_id == self.running.prompt_id:
            self._interrupt.set()

    def free(self, free_memory: bool) -> None:
        # Applied when the worker takes its next prompt, as the real worker does when idle.
        if free_memory:
            self._free_requested = True

    def history_slice(self, max_items: int | None, offset: int) -> JsonDict:
        if max_items is None and offset <= 0:
            return dict(self.history)
        if max_items is not None and offset < 0:
            last = list(itertools.islice(reversed(self.history.items()), max_items))
            return dict(reversed(last))
        stop = None if max_items is None else max(offset, 0) + max_items
        return dict(itertools.islice(self.history.items(), max(offset, 0), stop))

    # ----- worker ----------------------------------------------------------------------

    async def _work(self) -> None:
        while True:
            while not self.pending:
                self._wake.clear()
                await self._wake.wait()
            _, _, task = heapq.heappop(self.pending)
            started = time.monotonic()
            if self._last_finish is not None:
                self.switch_gaps_ms.append((started - self._last_finish) * 1000.0)
            if self._free_requested:
                self.cache.clear()
                self._free_requested = False
            self.running = task
            self.broadcast_status()
            entry = await self._execute(task)
            # Leaving the queue and entering the history is one step, as on the real server.
            self.history[task.prompt_id] = entry
            while len(self.history) > self.config.max_history:
                del self.history[next(iter(self.history))]
            self.running = None
            self.broadcast_status()
            self._to_client(task, "executing", {"node": None, "prompt_id": task.prompt_id})
            self._last_finish = time.monotonic()
            self._finished_since_start += 1
            limit = self.config.faults.crash_after_prompts
            if limit is not None and self._finished_since_start >= limit:
                self._on_crash()
                return

    def _to_client(
        self, task: Task, event: str, data: JsonDict, *, everyone_without_client: bool = False
    ) -> None:
        """Per-prompt messages follow the routing table of the protocol (§6.3)."""
        client_id = task.client_id
        if client_id is not None:
            self.hub.send(event, data, client_id)
        elif everyone_without_client:
            self.hub.send(event, data, None)

    def _record(self, run: _Run, event: str, data: JsonDict, everyone: bool = False) -> None:
        run.messages.append([event, data])
        self._to_client(run.task, event, data, everyone_without_client=everyone)

    def _progress(self, run: _Run) -> None:
        data = {"prompt_id": run.task.prompt_id, "nodes": dict(run.progress)}
        self._to_client(run.task, "progress_state", data, everyone_without_client=True)

    def _progress_entry(
        self, run: _Run, node_id: str, value: float, top: float, state: str
    ) -> None:
        run.progress[node_id] = {
            "value": value,
            "max": top,
            "state": state,
            "node_id": node_id,
            "prompt_id": run.task.prompt_id,
            "display_node_id": node_id,
            "parent_node_id": None,
            "real_node_id": node_id,
        }

    def _extra_key(self, prompt: graph.Prompt) -> Callable[[str], str | None]:
        def extra(node_id: str) -> str | None:
            node = prompt[node_id]
            if node["class_type"] != "LoadImage":
                return None
            try:
                return self.folders.content_hash(
                    self.folders.resolve_annotated(node["inputs"]["image"])
                )
            except (OSError, UnsafePath, KeyError):
                return f"unreadable:{time.monotonic_ns()}"

        return extra

    async def _execute(self, task: Task) -> JsonDict:
        started = gpu_clock()
        head_start = min(self._owed_s, PAYBACK_STEPS * self.config.step_seconds)
        run = _Run(task, gpu_deadline=started - head_start)
        prompt_id = task.prompt_id
        self._interrupt.clear()
        self.executions[prompt_id] += 1
        self._record(run, "execution_start", {"prompt_id": prompt_id, "timestamp": now_ms()})
        signature = graph.Signatures(task.prompt, self._extra_key(task.prompt))
        cached = {
            node_id
            for node_id in task.prompt
            if node_id in self.cache and self.cache[node_id].signature == signature(node_id)
        }
        self._record(
            run,
            "execution_cached",
            {
                "nodes": [node_id for node_id in task.prompt if node_id in cached],
                "prompt_id": prompt_id,
                "timestamp": now_ms(),
            },
        )
        order = list(graph.run_order(task.prompt, task.outputs, cached))
        failing = self._planned_failure(task.prompt, order, cached)
        results: dict[str, nodes.Outputs] = {n: self.cache[n].outputs for n in cached}
        outputs: JsonDict = {}
        meta: JsonDict = {}
        executed: list[str] = []
        status = "success"
        try:
            for node_id in order:
                class_type = task.prompt[node_id]["class_type"]
                if node_id in cached:
                    ui = self.cache[node_id].ui
                    self._executed(run, node_id, ui, outputs, meta)
                    self._progress_entry(run, node_id, 1, 1, "finished")
                    self._progress(run)
                    continue
                self._progress_entry(run, node_id, 0.0, 1.0, "running")
                self._progress(run)
                self.current_node = node_id
                self._executing(run, node_id)
                if self._interrupt.is_set():
                    raise _Interrupted(node_id)
                inputs = self._inputs(task.prompt, node_id, results)
                try:
                    if node_id == failing:
                        raise OutOfMemoryError(OOM_MESSAGE)
                    produced, ui = await nodes.NODES[class_type](
                        _NodeContext(self, run), node_id, inputs
                    )
                except _Interrupted:
                    raise
                except Exception as exc:
                    raise _NodeFailed(node_id, exc, inputs) from exc
                results[node_id] = produced
                self.cache[node_id] = _Cached(signature(node_id), produced, ui)
                executed.append(node_id)
                self._executed(run, node_id, ui, outputs, meta)
                entry = run.progress[node_id]
                if isinstance(entry["value"], float):
                    entry["value"] = 1.0
                entry["state"] = "finished"
                self._progress(run)
            if run.steps:
                self._settle_time(run, gpu_clock() - started)
            self._record(run, "execution_success", {"prompt_id": prompt_id, "timestamp": now_ms()})
        except _Interrupted as stop:
            status = "error"
            data = {
                "prompt_id": prompt_id,
                "node_id": stop.node_id,
                "node_type": task.prompt[stop.node_id]["class_type"],
                "executed": executed,
                "timestamp": now_ms(),
            }
            self._record(run, "execution_interrupted", data, everyone=True)
        except _NodeFailed as failed:
            status = "error"
            self._record(run, "execution_error", self._error_data(task, failed, executed))
        finally:
            self.current_node = None
        return {
            "prompt": task.item(),
            "outputs": outputs,
            "status": {
                "status_str": status,
                "completed": status == "success",
                "messages": run.messages,
            },
            "meta": meta,
        }

    def _executing(self, run: _Run, node_id: str) -> None:
        data = {"node": node_id, "display_node": node_id, "prompt_id": run.task.prompt_id}
        self._to_client(run.task, "executing", data)

    def _executed(
        self, run: _Run, node_id: str, ui: nodes.UI | None, outputs: JsonDict, meta: JsonDict
    ) -> None:
        if ui is None:
            return
        outputs[node_id] = ui
        meta[node_id] = {
            "node_id": node_id,
            "display_node": node_id,
            "parent_node": None,
            "real_node_id": node_id,
        }
        data = {
            "node": node_id,
            "display_node": node_id,
            "output": ui,
            "prompt_id": run.task.prompt_id,
        }
        self._to_client(run.task, "executed", data)

    def _planned_failure(
        self, prompt: graph.Prompt, order: list[str], cached: set[str]
    ) -> str | None:
        to_run = [node_id for node_id in order if node_id not in cached]
        if not to_run or not self.dice.roll("execution", self.config.faults.execution_error_rate):
            return None
        samplers = [n for n in to_run if prompt[n]["class_type"] in nodes.SAMPLERS]
        return samplers[0] if samplers else to_run[-1]

    @staticmethod
    def _inputs(
        prompt: graph.Prompt, node_id: str, results: Mapping[str, nodes.Outputs]
    ) -> dict[str, Any]:
        values = dict(prompt[node_id]["inputs"])
        for name, source, slot in graph.links(prompt, node_id):
            values[name] = results[source][slot]
        return values

    @staticmethod
    def _error_data(task: Task, failed: _NodeFailed, executed: list[str]) -> JsonDict:
        current = {
            name: [value if isinstance(value, str) else repr(value)]
            for name, value in failed.inputs.items()
        }
        return {
            "prompt_id": task.prompt_id,
            "node_id": failed.node_id,
            "node_type": task.prompt[failed.node_id]["class_type"],
            "executed": executed,
            "exception_message": f"{failed.error}\n",
            "exception_type": type_name(failed.error),
            "traceback": traceback.format_tb(failed.error.__traceback__),
            "current_inputs": current,
            "current_outputs": list(task.prompt),
            "timestamp": now_ms(),
        }

    def _settle_time(self, run: _Run, took: float) -> None:
        # Bounded, so that a long freeze cannot make many later prompts short.
        over = took - run.steps * self.config.step_seconds
        kept = OWED_STEPS_KEPT * self.config.step_seconds
        self._owed_s = min(max(self._owed_s + over, 0.0), kept)

    async def _gpu_wait(self, seconds: float) -> None:
        """Let emulated GPU time pass; an interrupt ends the wait early."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._interrupt.wait(), timeout=seconds)

    async def step(self, run: _Run, node_id: str, value: int, total: int) -> None:
        seconds = self.config.step_seconds
        if seconds > 0:
            now = gpu_clock()
            # Behind (a stalled host), steps come no faster than two per step time: a real
            # GPU does not burst, and clients see the pace they would.
            run.gpu_deadline = max(run.gpu_deadline + seconds, now + seconds / 2)
            run.steps += 1
            await self._gpu_wait(run.gpu_deadline - now)
        else:
            await asyncio.sleep(0)
        if self._interrupt.is_set():
            raise _Interrupted(node_id)
        self._progress_entry(run, node_id, value, total, "running")
        self._progress(run)
        faults = self.config.faults
        is_sampler = run.task.prompt[node_id]["class_type"] in nodes.SAMPLERS
        preview = faults.preview_frames and is_sampler
        target = run.task.client_id
        if preview:
            self.hub.preview(
                target, Preview(node_id, run.task.prompt_id, faults.preview_bytes, True)
            )
        data = {"value": value, "max": total, "prompt_id": run.task.prompt_id, "node": node_id}
        self._to_client(run.task, "progress", data, everyone_without_client=True)
        if preview:
            self.hub.preview(
                target, Preview(node_id, run.task.prompt_id, faults.preview_bytes, False)
            )


class _NodeContext:
    """The nodes.Context a node sees while its prompt runs."""

    def __init__(self, executor: Executor, run: _Run) -> None:
        self._executor = executor
        self._run = run
        self.folders = executor.folders
        self.writer = executor.writer
        self.models = executor.models
        self.video_max_side = executor.video_max_side
        self.placeholder_models = executor.config.placeholder_models

    async def step(self, node_id: str, value: int, total: int) -> None:
        await self._executor.step(self._run, node_id, value, total)
