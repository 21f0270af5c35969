"""The life of one job on one lane: prepare, submit, follow, fetch, record.

Every state change goes through the repository's named methods; this module decides what
happens next and never writes SQL. The write-ahead rule holds throughout: the attempt and its
prompt_id are committed before POST /prompt, and a file is recorded only after it is
verified and renamed into place.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from batch_runner import clock, outputs
from batch_runner.comfy.failures import classify_execution_error
from batch_runner.comfy.models import HistoryEntry, Outcome, OutputFile
from batch_runner.config import RunSettings
from batch_runner.disk import fsync_path
from batch_runner.errors import (
    BatchRunnerError,
    DownloadIncomplete,
    EndpointError,
    EndpointUnavailable,
    ExecutionInterrupted,
    InputError,
    PermanentError,
    PromptLost,
    TransientError,
    WorkflowRejected,
)
from batch_runner.lane import EndpointGone, Lane
from batch_runner.planning import Planner, Prepared
from batch_runner.states import AttemptState, JobState
from batch_runner.store import AttemptRecord, JobRecord, Store
from batch_runner.tracking import PromptWatch, outcome_of

log = logging.getLogger(__name__)

DOWNLOAD_TRIES = 3
#: checks of a silent prompt may fail for this many silence periods before the attempt ends
MAX_FAILED_CHECKS = 5
#: How often a prompt submitted by another runner is looked up in /queue and /history.
FOREIGN_POLL_S = 1.0


class StaleUpload(TransientError):
    """The endpoint no longer has an image we uploaded earlier; it is uploaded again."""


@dataclass
class JobFlow:
    store: Store
    settings: RunSettings
    planner: Planner
    stopping: asyncio.Event
    #: why the run stopped by itself (disk full), for the summary
    stop_reason: str | None = None

    def request_stop(self, reason: str) -> None:
        if self.stop_reason is None:
            self.stop_reason = reason
            log.error("stopping the run: %s", reason)
        self.stopping.set()

    # ---------------------------------------------------------------- entry points

    async def run_claimed(self, job: JobRecord, lane: Lane) -> None:
        """A freshly claimed job: prepare it, commit the attempt, submit and follow it."""
        with lane.preparing_one():
            started = await self._prepare_and_commit(job, lane)
        if started is not None:
            prepared, attempt = started
            await self.follow(job, attempt, lane, prepared, submit=True)

    async def _prepare_and_commit(
        self, job: JobRecord, lane: Lane
    ) -> tuple[Prepared, AttemptRecord] | None:
        """Upload and render, then commit the attempt (the write-ahead record); None when the
        job cannot be submitted now (what happened to it is recorded)."""
        try:
            prepared = await self.planner.prepare(job, lane, self.store)
        except (InputError, PermanentError) as exc:
            await self.store.preparation_failed(
                job.id, error=_one_line(exc), kind=_kind(exc), retry_at=None
            )
            return None
        except EndpointUnavailable as exc:
            # Nothing reached the GPU: the job goes straight back for a healthy endpoint to
            # take, and this does not use up one of its attempts.
            await self.store.preparation_failed(
                job.id,
                error=_one_line(exc),
                kind=_kind(exc),
                retry_at=clock.now().timestamp(),
                endpoint_id=lane.record.id,
                count_attempt=False,
            )
            return None
        except TransientError as exc:
            await self._prep_retry(job, lane, exc)
            return None
        if self.stopping.is_set():
            await self.store.release(job.id, "run stopping before submission")
            return None
        attempt = await self.store.begin_attempt(
            job.id, lane.record.id, prepared.graph, prepared.resolved
        )
        return prepared, attempt

    async def resume(
        self, job: JobRecord, attempt: AttemptRecord, lane: Lane, *, foreign: bool = False
    ) -> None:
        """An attempt found in flight when the runner started: re-attach by prompt_id.

        ``foreign``: taken over from another runner, whose socket got the prompt's messages;
        ours never will, so the prompt is followed by asking the server.
        """
        prepared = self.planner.prepared_from(job, attempt)
        if job.state is JobState.FETCHING and attempt.outputs is not None:
            files = [OutputFile(**o) for o in attempt.outputs]
            await self._fetch_and_record(job, attempt, lane, prepared, files)
            return
        watch = lane.tracker.watch(attempt.prompt_id, job.key)
        if foreign:
            watch.poll = FOREIGN_POLL_S
        try:
            location = await lane.locate(attempt.prompt_id)
        except EndpointGone as exc:
            lane.tracker.forget(attempt.prompt_id)
            await self._abandon(job, attempt, lane, exc)
            return
        if not location.unknown:
            watch.accepted = True
            lane.tracker.reconciled(
                watch, location.entry, running=location.running, pending=location.pending
            )
            await self.follow(job, attempt, lane, prepared, submit=False)
        elif attempt.state is AttemptState.INTENT:
            # Committed but never accepted: sending it now under the same id cannot duplicate.
            await self.follow(job, attempt, lane, prepared, submit=True)
        else:
            lane.tracker.forget(attempt.prompt_id)
            await self._attempt_error(
                job,
                attempt,
                lane,
                PromptLost(
                    f"{lane.name} no longer knows prompt {attempt.prompt_id} "
                    "(server restarted or queue cleared)",
                    endpoint=lane.name,
                ),
                AttemptState.LOST,
            )

    # ---------------------------------------------------------------- submit and follow

    async def follow(
        self,
        job: JobRecord,
        attempt: AttemptRecord,
        lane: Lane,
        prepared: Prepared,
        *,
        submit: bool,
    ) -> None:
        watch = lane.tracker.watch(attempt.prompt_id, job.key)
        try:
            if submit:
                await self._submit(job, attempt, lane, watch)
            await self._await_end(job, attempt, lane, watch)
        except EndpointGone as exc:
            await self._abandon(job, attempt, lane, exc)
            return
        except WorkflowRejected as exc:
            error: EndpointError = exc
            if "Invalid image file" in str(exc):
                # The server lost the input image we uploaded earlier (restart, cleanup).
                lane.forget_uploads()
                await self.store.forget_uploads(lane.record.id)
                error = StaleUpload(str(exc), endpoint=lane.name)
            await self._attempt_error(job, attempt, lane, error)
            return
        except (TransientError, PermanentError) as exc:
            await self._attempt_error(job, attempt, lane, exc)
            return
        finally:
            lane.tracker.forget(attempt.prompt_id)
        await self._settle(job, attempt, lane, prepared, watch)

    async def _submit(
        self, job: JobRecord, attempt: AttemptRecord, lane: Lane, watch: PromptWatch
    ) -> None:
        try:
            await lane.client.submit(
                attempt.graph, prompt_id=attempt.prompt_id, client_id=lane.client_id
            )
        except (TransientError, EndpointError) as exc:
            if isinstance(exc, PermanentError):
                raise
            # The answer may have been lost after the server queued the prompt: ask it before
            # deciding, so the prompt never runs twice.
            location = await lane.locate(attempt.prompt_id)
            if location.unknown:
                raise
            lane.tracker.reconciled(
                watch, location.entry, running=location.running, pending=location.pending
            )
            log.info("%s: adopted %s after a lost submit answer", lane.name, job.key)
        watch.accepted = True
        lane.accepted_one.set()
        await self.store.attempt_queued(attempt.id)

    async def _await_end(
        self, job: JobRecord, attempt: AttemptRecord, lane: Lane, watch: PromptWatch
    ) -> None:
        silence = self.settings.timeouts.silence
        failing_since: float | None = None
        while True:
            if watch.started and not watch.recorded_running:
                watch.recorded_running = True
                await self.store.attempt_running(job.id, attempt.id)
            if watch.finished:
                return
            watch.changed.clear()
            remaining = silence - (clock.monotonic() - watch.last_heard)
            wait = remaining if watch.poll is None else min(remaining, watch.poll)
            try:
                await asyncio.wait_for(watch.changed.wait(), timeout=max(0.01, wait))
            except TimeoutError:
                try:
                    # A polled prompt is silent by nature: that says nothing about our socket.
                    await lane.reconcile(watch, after_silence=watch.poll is None)
                except EndpointGone:
                    raise
                except TransientError as exc:
                    # Not knowing is no reason to give up on a prompt that may be running:
                    # ask again, for a while.
                    failing_since = failing_since or clock.monotonic()
                    if clock.monotonic() - failing_since >= MAX_FAILED_CHECKS * silence:
                        raise
                    log.info("%s: could not check %s: %s", lane.name, job.key, exc)
                    watch.touch()
                else:
                    failing_since = None

    # ---------------------------------------------------------------- outcome

    async def _settle(
        self,
        job: JobRecord,
        attempt: AttemptRecord,
        lane: Lane,
        prepared: Prepared,
        watch: PromptWatch,
    ) -> None:
        if watch.lost:
            error: BatchRunnerError = PromptLost(
                f"{lane.name} no longer knows prompt {attempt.prompt_id}", endpoint=lane.name
            )
            await self._attempt_error(job, attempt, lane, error, AttemptState.LOST)
            return
        try:
            entry = watch.entry or await self._history(attempt, lane, prepared, watch)
        except EndpointGone as exc:
            await self._abandon(job, attempt, lane, exc)
            return
        outcome = entry.outcome if entry is not None else outcome_of(watch)
        if outcome is Outcome.SUCCESS:
            # Output files outlive a server restart: if history is gone, the files the socket
            # announced are still worth fetching before any GPU time is spent again.
            files = prepared.pick_outputs(
                entry.outputs if entry is not None else tuple(watch.outputs)
            )
            if not files:
                error = (
                    outputs.no_video_error(entry, lane.name)
                    if entry is not None
                    else PromptLost(
                        f"{lane.name} reported success for {attempt.prompt_id} but no longer "
                        "knows its outputs",
                        endpoint=lane.name,
                    )
                )
                state = AttemptState.FAILED if entry is not None else AttemptState.LOST
                await self._attempt_error(job, attempt, lane, error, state)
                return
            lane.done_count += 1
            if await self.store.attempt_completed(
                job.id, attempt.id, [dataclasses.asdict(f) for f in files]
            ):
                await self._fetch_and_record(job, attempt, lane, prepared, files)
        elif outcome is Outcome.INTERRUPTED:
            await self._attempt_error(
                job,
                attempt,
                lane,
                ExecutionInterrupted(
                    f"prompt {attempt.prompt_id} was interrupted on {lane.name}", endpoint=lane.name
                ),
            )
        else:
            await self._attempt_error(job, attempt, lane, _execution_error(entry, watch, lane))

    async def _history(
        self, attempt: AttemptRecord, lane: Lane, prepared: Prepared, watch: PromptWatch
    ) -> HistoryEntry | None:
        """The prompt's history entry; None when the socket already told its success and
        its video (``executed`` is sent for cached output nodes too, PROTOCOL §5), so
        asking again would only repeat it."""
        if outcome_of(watch) is Outcome.SUCCESS and prepared.pick_outputs(tuple(watch.outputs)):
            return None
        return await lane.call(lambda: lane.client.history(attempt.prompt_id))

    async def _fetch_and_record(
        self,
        job: JobRecord,
        attempt: AttemptRecord,
        lane: Lane,
        prepared: Prepared,
        files: list[OutputFile],
    ) -> None:
        file = files[0]
        try:
            suffix = outputs.safe_extension(file.filename)
        except PermanentError as exc:
            await self._attempt_error(job, attempt, lane, exc)
            return
        final = self.settings.output_dir / f"{prepared.output_stem}{suffix}"
        incoming = self.settings.output_dir / ".incoming" / final.name
        try:
            got = await self._download_verified(job, attempt, lane, prepared, file, incoming)
        finally:
            # Whatever happened, nothing unverified stays behind to be mistaken for a result.
            incoming.unlink(missing_ok=True)
        if got is None:
            return
        await self.store.job_succeeded(
            job.id, attempt.id, path=str(final), sha256=got.sha256, size=got.size
        )

    async def _download_verified(
        self,
        job: JobRecord,
        attempt: AttemptRecord,
        lane: Lane,
        prepared: Prepared,
        file: OutputFile,
        incoming: Path,
    ) -> outputs.Downloaded | None:
        """Download, verify and promote the video; None when the attempt ended otherwise."""
        out_dir = self.settings.output_dir
        final = out_dir / incoming.name
        for try_number in range(1, DOWNLOAD_TRIES + 1):
            try:
                got = await lane.call(
                    lambda: outputs.download(lane.client, file, incoming, base_dir=out_dir)
                )
                if self.settings.verify_video:
                    await asyncio.to_thread(
                        outputs.verify_video, incoming, prepared.expected_frames
                    )
                await asyncio.to_thread(_promote, incoming, final)
                lane.download_succeeded()
                return got
            except outputs.DiskFull as exc:
                # The video is safe on the server: leave the job fetching for the next run to
                # download, and stop taking work that would need disk space we lack.
                self.request_stop(f"{exc}; free some space and run the same command again")
                return None
            except DownloadIncomplete as exc:
                if try_number == DOWNLOAD_TRIES:
                    lane.download_failed(exc)
                    await self._attempt_error(job, attempt, lane, exc)
                    return None
                log.info("%s: %s; downloading again", lane.name, exc)
            except EndpointGone as exc:
                await self._abandon(job, attempt, lane, exc)
                return None
            except (TransientError, PermanentError) as exc:
                await self._attempt_error(job, attempt, lane, exc)
                return None
        return None  # every try ended above; kept for the type checker

    # ---------------------------------------------------------------- failures

    def _retry_at(self, attempts_made: int) -> float | None:
        policy = self.settings.retry
        if attempts_made >= policy.max_attempts:
            return None
        return clock.now().timestamp() + policy.delay(attempts_made)

    async def _prep_retry(self, job: JobRecord, lane: Lane, exc: BaseException) -> None:
        await self.store.preparation_failed(
            job.id,
            error=_one_line(exc),
            kind=_kind(exc),
            retry_at=self._retry_at(job.attempts + 1),
            endpoint_id=lane.record.id,
        )

    async def _attempt_error(
        self,
        job: JobRecord,
        attempt: AttemptRecord,
        lane: Lane,
        exc: BaseException,
        attempt_state: AttemptState = AttemptState.FAILED,
    ) -> None:
        transient = isinstance(exc, TransientError)
        retry_at = self._retry_at(attempt.number) if transient else None
        state = await self.store.attempt_failed(
            job.id,
            attempt.id,
            error=_one_line(exc),
            kind=_kind(exc),
            retry_at=retry_at,
            attempt_state=attempt_state,
            endpoint_id=lane.record.id,
        )
        level = logging.INFO if state is JobState.RETRY_WAIT else logging.WARNING
        log.log(level, "%s: job %s %s: %s", lane.name, job.key, state.value, _one_line(exc))

    async def _abandon(
        self, job: JobRecord, attempt: AttemptRecord, lane: Lane, exc: BaseException
    ) -> None:
        """Give up on an unreachable endpoint's prompt: the job moves on elsewhere, and the
        abandoned attempt's result is never accepted, even if that server finishes it later."""
        await self._attempt_error(job, attempt, lane, exc, AttemptState.ABANDONED)


def _execution_error(entry: HistoryEntry | None, watch: PromptWatch, lane: Lane) -> EndpointError:
    info = entry.error if entry is not None else getattr(watch.ended, "info", None)
    if info is None:
        return PromptLost(
            f"prompt {watch.prompt_id} failed on {lane.name} without details", endpoint=lane.name
        )
    cls = classify_execution_error(info)
    message = (
        f"{info.node_type} (node {info.node_id}) failed on {lane.name}: "
        f"{info.exception_type}: {info.exception_message.strip()}"
    )
    return cls(message, endpoint=lane.name)


def _promote(incoming: Path, final: Path) -> None:
    os.replace(incoming, final)
    fsync_path(final.parent)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:500] or type(exc).__name__


def _kind(exc: BaseException) -> str:
    return type(exc).__name__
