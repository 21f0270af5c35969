"""Prometheus metrics for ``--metrics-port``: read from the run database every few seconds.

Reading the store rather than hooking every code path keeps the metrics true to what was
committed, and makes the fleet-wide figures (jobs by state, per-endpoint attempts, failure
reasons) the same on every runner of a shared run. The histograms count only this runner's
jobs, so sums over runners do not double count.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Sequence
from wsgiref.simple_server import WSGIServer

from batch_runner.errors import ConfigError
from batch_runner.lane import Lane
from batch_runner.states import AttemptState, JobState
from batch_runner.store import Store

log = logging.getLogger(__name__)

REFRESH_S = 2.0
DURATION_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600, float("inf"))
WAIT_BUCKETS = (0.1, 0.5, 1, 5, 15, 30, 60, 120, 300, 600, 1800, float("inf"))
_IN_FLIGHT = {AttemptState.INTENT, AttemptState.QUEUED, AttemptState.RUNNING}
_FAILED = {AttemptState.FAILED, AttemptState.LOST, AttemptState.ABANDONED}


class RunMetrics:
    def __init__(
        self, store: Store, run_id: int, lanes: Sequence[Lane], runner_id: int | None
    ) -> None:
        try:
            from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
        except ImportError:
            raise ConfigError(
                "--metrics-port needs prometheus-client: pip install 'batch-runner[metrics]'"
            ) from None
        self.store, self.run_id, self.lanes, self.runner_id = store, run_id, lanes, runner_id
        self.registry = CollectorRegistry()
        r = self.registry
        self.jobs = Gauge("batch_runner_jobs", "Jobs of the run by state", ["state"], registry=r)
        self.in_flight = Gauge(
            "batch_runner_endpoint_in_flight",
            "Prompts submitted and not finished, per endpoint",
            ["endpoint"],
            registry=r,
        )
        self.done = Gauge(
            "batch_runner_endpoint_done",
            "Attempts that succeeded, per endpoint",
            ["endpoint"],
            registry=r,
        )
        self.failed = Gauge(
            "batch_runner_endpoint_failed",
            "Attempts that ended in an error, per endpoint",
            ["endpoint"],
            registry=r,
        )
        self.retries = Gauge(
            "batch_runner_attempt_failures",
            "Attempts that ended in an error, by reason (the job retried or failed)",
            ["reason"],
            registry=r,
        )
        self.duration = Histogram(
            "batch_runner_job_duration_seconds",
            "From claim to verified video, per job this runner finished",
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "batch_runner_queue_wait_seconds",
            "From the server accepting a prompt to starting it",
            buckets=WAIT_BUCKETS,
            registry=r,
        )
        self.reconnects = Counter(
            "batch_runner_websocket_reconnects",
            "Websocket connections lost and reopened, per endpoint",
            ["endpoint"],
            registry=r,
        )
        self._since = 0.0
        self._server: tuple[WSGIServer, threading.Thread] | None = None
        self._disconnects_seen = {lane.settings.url: 0 for lane in lanes}

    async def refresh(self) -> None:
        counts = await self.store.counts(self.run_id)
        for state in JobState:
            self.jobs.labels(state.value).set(counts.get(state, 0))
        by_endpoint = await self.store.endpoint_counts(self.run_id)
        for url, states in by_endpoint.items():
            self.in_flight.labels(url).set(sum(states.get(s.value, 0) for s in _IN_FLIGHT))
            self.done.labels(url).set(states.get(AttemptState.SUCCEEDED.value, 0))
            self.failed.labels(url).set(sum(states.get(s.value, 0) for s in _FAILED))
        for reason, n in (await self.store.failure_reasons(self.run_id)).items():
            self.retries.labels(reason).set(n)
        seen = await self.store.observations(self.run_id, self._since, self.runner_id)
        for seconds in seen.job_durations:
            self.duration.observe(seconds)
        for seconds in seen.queue_waits:
            self.queue_wait.observe(seconds)
        self._since = seen.until
        for lane in self.lanes:
            url = lane.settings.url
            new = lane.ws_disconnects - self._disconnects_seen[url]
            if new:
                self.reconnects.labels(url).inc(new)
                self._disconnects_seen[url] = lane.ws_disconnects

    def start(self, port: int) -> None:
        """Serve /metrics on the loopback port (0: any free one), from a thread."""
        from prometheus_client import start_http_server

        try:
            self._server = start_http_server(port, addr="127.0.0.1", registry=self.registry)
        except OSError as exc:
            raise ConfigError(f"--metrics-port {port}: {exc.strerror}") from None
        log.info("metrics on http://127.0.0.1:%d/metrics", self._server[0].server_port)

    async def keep_fresh(self) -> None:
        while True:
            await asyncio.sleep(REFRESH_S)
            await self.refresh()

    async def close(self) -> None:
        if self._server is not None:
            await asyncio.to_thread(_stop, *self._server)
            self._server = None


def _stop(server: WSGIServer, thread: threading.Thread) -> None:
    server.shutdown()
    server.server_close()
    thread.join()
