"""The batch-runner command line. Commands parse flags and hand over; nothing else lives here."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import os
import re
import signal
import sys
from collections import defaultdict
from collections.abc import Callable, Coroutine, Sequence
from contextlib import AsyncExitStack, suppress
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape

from batch_runner import __version__
from batch_runner.config import RunSettings, build_settings, default_db
from batch_runner.errors import BatchRunnerError, InputError, RunLocked
from batch_runner.store.location import DbLocation, location

if TYPE_CHECKING:
    from batch_runner.lane import Lane
    from batch_runner.runner import Monitor
    from batch_runner.store import Store

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130

F = TypeVar("F", bound=Callable[..., Any])
stderr = Console(stderr=True)
log = logging.getLogger("batch_runner")


_SECRET = re.compile(r"(?i)(authorization:\s*bearer\s+|bearer\s+)\S+")


class RedactSecrets(logging.Filter):
    """Mask bearer tokens in every log line, including libraries' debug dumps of headers."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        redacted = _SECRET.sub(r"\1***", message)
        if redacted != message:
            record.msg, record.args = redacted, None
        return True


def _setup_logging(debug: bool, quiet: bool, json_logs: bool = False) -> None:
    level = logging.DEBUG if debug else logging.WARNING if quiet else logging.INFO
    handler: logging.Handler
    if json_logs:
        from batch_runner.jsonlog import JsonFormatter

        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(JsonFormatter())
    else:
        handler = RichHandler(console=stderr, show_path=debug, rich_tracebacks=debug, markup=False)
    handler.addFilter(RedactSecrets())
    logging.basicConfig(level=level, handlers=[handler], format="%(message)s", force=True)
    if not debug:
        # Third-party libraries speak only when something is wrong.
        for name in ("aiohttp", "websockets", "alembic", "sqlalchemy"):
            logging.getLogger(name).setLevel(logging.WARNING)


def _json_logs() -> bool:
    context = click.get_current_context(silent=True)
    return bool(context and context.find_root().params.get("json_logs"))


def _say_error(message: str) -> None:
    """An error for the user: a log record with --json-logs, a red line otherwise."""
    if _json_logs():
        log.error("%s", message)
    else:
        stderr.print(f"[bold red]error:[/] {escape(message)}", markup=True, highlight=False)


def handle_errors(func: F) -> F:
    """Turn expected errors into one plain message and an exit code; tracebacks only with
    --debug."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        debug = bool(click.get_current_context().find_root().params.get("debug"))
        try:
            return func(*args, **kwargs)
        except BatchRunnerError as exc:
            if debug:
                raise
            _say_error(str(exc))
            code = EXIT_USAGE if isinstance(exc, InputError | RunLocked) else EXIT_FAILED
            sys.exit(code)
        except (KeyboardInterrupt, click.exceptions.Exit, click.ClickException, SystemExit):
            raise
        except Exception as exc:
            if debug:
                raise
            if isinstance(exc, OSError) and exc.filename:
                # A file or folder the user named cannot be read or written.
                _say_error(
                    f"cannot use {exc.filename}: {exc.strerror}. Check the path and its "
                    "permissions, then run the same command again."
                )
                sys.exit(EXIT_USAGE)
            stderr.print(
                f"[bold red]internal error:[/] {type(exc).__name__}: {escape(str(exc))}\n"
                "Run the same command with --debug for details; the run database is intact.",
                markup=True,
                highlight=False,
            )
            sys.exit(EXIT_FAILED)

    return wrapper  # type: ignore[return-value]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="batch-runner")
@click.option("--debug", is_flag=True, help="Verbose logs and full tracebacks.")
@click.option("--quiet", "-q", is_flag=True, help="Only warnings and errors; no progress display.")
@click.option(
    "--json-logs",
    is_flag=True,
    help="Logs (and progress lines) as one JSON object per line on stderr, for machines.",
)
def main(debug: bool, quiet: bool, json_logs: bool) -> None:
    """Turn (image, prompt) pairs into Wan2.2 image-to-video clips on ComfyUI servers.

    Start with `batch-runner run jobs.csv --endpoint http://HOST:8188`; run the same command
    again to resume an interrupted run.
    """
    _setup_logging(debug, quiet, json_logs)


def _db_for(manifest: Path | None, db: DbLocation | None) -> DbLocation:
    if db is not None:
        return db
    if manifest is None:
        raise click.UsageError("give the MANIFEST the run was started with, or --db PATH")
    return default_db(manifest)


def _db_location(ctx: click.Context, param: click.Parameter, value: str | None) -> Any:
    """``--db``: a file path, or a database URL kept as text."""
    if value is None:
        return None
    given = location(value)
    if isinstance(given, Path) and given.is_dir():
        raise click.BadParameter(f"{given} is a directory; give a file path or a database URL")
    return given


manifest_arg = click.argument(
    "manifest", type=click.Path(dir_okay=False, path_type=Path), required=False
)
db_option = click.option(
    "--db",
    callback=_db_location,
    metavar="PATH|URL",
    help="Run database: an SQLite file (default: MANIFEST.batch.sqlite beside the manifest), "
    "or postgresql+asyncpg://USER:PASS@HOST/DB shared by several runners.",
)


def workflow_options(func: F) -> F:
    """Options that choose and set up the built-in template or convert UI-format files."""
    options = [
        click.option(
            "--lora-high",
            metavar="FILE[:STRENGTH]",
            help="LoRA on the built-in template's high-noise expert (as in /models/loras).",
        ),
        click.option(
            "--lora-low",
            metavar="FILE[:STRENGTH]",
            help="LoRA on the built-in template's low-noise expert.",
        ),
        click.option(
            "--fast4",
            is_flag=True,
            help="Built-in template in the 4-step set-up: 4 steps, cfg 1.0, experts switch "
            "at step 2, 4-step LoRAs (default file names unless --lora-high/--lora-low).",
        ),
        click.option(
            "--object-info",
            type=click.Path(exists=True, dir_okay=False, path_type=Path),
            help="Saved /object_info answer for converting UI-format workflows offline.",
        ),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _run_async(coro: Coroutine[Any, Any, int]) -> int:
    return asyncio.run(coro)


# ------------------------------------------------------------------------------------ run


@main.command()
@click.argument("manifest", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--endpoint",
    "-e",
    "endpoints",
    multiple=True,
    metavar="URL",
    help="ComfyUI server, e.g. http://gpu1:8188 (repeat for several).",
)
@click.option(
    "--token",
    metavar="TOKEN",
    envvar="BATCH_RUNNER_TOKEN",
    show_envvar=True,
    help="Bearer token sent to every --endpoint.",
)
@click.option(
    "--config",
    "config_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="TOML file with endpoints, tokens, bindings and limits.",
)
@db_option
@click.option(
    "--output-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Where videos go (default: outputs/MANIFEST_STEM/ beside the manifest).",
)
@click.option(
    "--workflow",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Custom workflow saved from ComfyUI, API or UI format (default: built-in Wan2.2 I2V).",
)
@click.option(
    "--bind",
    "binds",
    multiple=True,
    metavar="FIELD=NODE.INPUT",
    help="Map a job field to a node input of --workflow, e.g. prompt=6.text.",
)
@workflow_options
@click.option("--preset", type=click.Choice(["480p", "720p"]), help="Resolution preset.")
@click.option(
    "--max-inflight",
    type=click.IntRange(min=1),
    help="Prompts per endpoint at once (default 2: one running, one queued).",
)
@click.option("--max-attempts", type=click.IntRange(min=1), help="Tries per job (default 3).")
@click.option(
    "--emulate",
    type=click.IntRange(min=1, max=32),
    metavar="N",
    help="Start N emulated ComfyUI endpoints in this process (a dry run).",
)
@click.option("--skip-invalid", is_flag=True, help="Run the valid rows; record invalid ones.")
@click.option(
    "--rerun-changed",
    is_flag=True,
    help="Run again the finished rows whose manifest content changed.",
)
@click.option(
    "--runner-name",
    metavar="NAME",
    help="With a PostgreSQL --db: this runner's name in the run (default: the host name); "
    "restarted under the same name, it resumes its own jobs.",
)
@click.option(
    "--takeover-after",
    type=click.FloatRange(min=1.0),
    default=60.0,
    show_default=True,
    metavar="SECONDS",
    help="With a PostgreSQL --db: adopt the jobs of a runner silent this long.",
)
@click.option(
    "--metrics-port",
    type=click.IntRange(min=0, max=65535),
    metavar="PORT",
    help="Serve Prometheus metrics on http://127.0.0.1:PORT/metrics (0: any free port).",
)
@handle_errors
def run(
    manifest: Path,
    endpoints: tuple[str, ...],
    token: str | None,
    config_file: Path | None,
    db: DbLocation | None,
    output_dir: Path | None,
    workflow: Path | None,
    binds: tuple[str, ...],
    lora_high: str | None,
    lora_low: str | None,
    fast4: bool,
    object_info: Path | None,
    preset: str | None,
    max_inflight: int | None,
    max_attempts: int | None,
    emulate: int | None,
    skip_invalid: bool,
    rerun_changed: bool,
    runner_name: str | None,
    takeover_after: float,
    metrics_port: int | None,
) -> None:
    """Run (or resume) the batch in MANIFEST (.csv or .jsonl).

    Exit codes: 0 all videos made, 1 some jobs failed, 2 bad input or usage,
    130 interrupted (run the same command again to resume).
    """
    if emulate and endpoints:
        raise click.UsageError("use either --emulate or --endpoint, not both")
    settings = build_settings(
        manifest,
        config_file=config_file,
        endpoints=endpoints or (),
        token=token,
        db=db,
        output_dir=output_dir,
        workflow=workflow,
        binds=binds,
        preset=preset,
        max_inflight=max_inflight,
        max_attempts=max_attempts,
        skip_invalid=skip_invalid,
        rerun_changed=rerun_changed,
        object_info=object_info,
        lora_high=lora_high,
        lora_low=lora_low,
        fast4=fast4,
    )
    settings = dataclasses.replace(
        settings,
        runner_name=runner_name,
        takeover_after=takeover_after,
        metrics_port=metrics_port,
    )
    if not settings.endpoints and not emulate:
        raise click.UsageError(
            "no endpoint: give --endpoint URL (or endpoints in --config), or --emulate N for a "
            "dry run against emulated servers"
        )
    sys.exit(_run_async(_run(settings, emulate)))


async def _run(settings: RunSettings, emulate: int | None) -> int:
    from dataclasses import replace

    from batch_runner.runner import run_batch
    from batch_runner.workflows import load_workflows

    stopping = asyncio.Event()
    _install_signal_handlers(stopping)
    async with AsyncExitStack() as stack:
        if emulate:
            from batch_runner.config import EndpointSettings
            from batch_runner.emulator import Emulator, EmulatorConfig

            urls = []
            for _ in range(emulate):
                emulator = await stack.enter_async_context(Emulator(EmulatorConfig()))
                urls.append(emulator.url)
            inflight = settings.endpoints[0].max_inflight if settings.endpoints else 2
            settings = replace(
                settings, endpoints=tuple(EndpointSettings(u, None, inflight) for u in urls)
            )
            log.info("started %d emulated endpoint(s): %s", emulate, ", ".join(urls))
        # After the emulators start: converting a UI-format workflow may ask an endpoint.
        templates = await load_workflows(settings)
        summary = await run_batch(settings, templates, stopping, _progress_monitor())
    _print_summary(settings, summary)
    return summary.exit_code


def _progress_monitor() -> Monitor | None:
    from batch_runner.progress import report_progress

    if log.getEffectiveLevel() > logging.INFO:
        return None
    live = stderr.is_terminal and not _json_logs()

    async def monitor(store: Store, run_id: int, lanes: Sequence[Lane]) -> None:
        await report_progress(store, run_id, lanes, stderr, live=live)

    return monitor


def _install_signal_handlers(stopping: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()

    def on_signal(signum: int) -> None:
        if stopping.is_set():
            stderr.print("second interrupt: exiting now; run the same command to resume")
            os._exit(EXIT_INTERRUPTED)
        stderr.print(
            f"{signal.Signals(signum).name}: finishing the prompts in flight, claiming no new "
            "jobs (interrupt again to exit at once; either way the run resumes)"
        )
        stopping.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig)


def _print_summary(settings: RunSettings, summary: Any) -> None:
    from batch_runner.progress import describe

    out = Console()
    out.print(f"{describe(summary.counts)}; videos in {settings.output_dir}", highlight=False)
    if summary.stop_reason:
        stderr.print(f"[bold red]stopped:[/] {summary.stop_reason}", markup=True, highlight=False)
    elif summary.stopped:
        out.print("stopped before the end; run the same command again to resume")


# ------------------------------------------------------------------------------------ status


@main.command()
@manifest_arg
@db_option
@click.option(
    "--watch",
    "-w",
    is_flag=True,
    help="Keep refreshing (progress, speed, ETA, recent failures) until Ctrl-C; works on a "
    "run started elsewhere.",
)
@click.option(
    "--interval",
    default=2.0,
    show_default=True,
    type=click.FloatRange(min=0.1),
    metavar="SECONDS",
    help="Refresh period for --watch.",
)
@handle_errors
def status(manifest: Path | None, db: DbLocation | None, watch: bool, interval: float) -> None:
    """Counts per state and per endpoint, and the failures with their reasons."""
    from batch_runner.status import print_status

    if watch:
        from batch_runner.watch import watch_status

        # A signal before the watch set its handlers up interrupts as usual.
        with suppress(KeyboardInterrupt):
            asyncio.run(watch_status(_db_for(manifest, db), Console(), interval))
        sys.exit(EXIT_OK)
    sys.exit(_run_async(print_status(_db_for(manifest, db), Console())))


@main.command()
@manifest_arg
@db_option
@handle_errors
def retry(manifest: Path | None, db: DbLocation | None) -> None:
    """Send failed and cancelled jobs back to pending; the next `run` tries them again."""
    from batch_runner.status import retry_failed

    sys.exit(_run_async(retry_failed(_db_for(manifest, db), Console())))


@main.command()
@manifest_arg
@db_option
@click.option(
    "--token",
    metavar="TOKEN",
    envvar="BATCH_RUNNER_TOKEN",
    show_envvar=True,
    help="Bearer token for the run's endpoints.",
)
@click.option(
    "--config",
    "config_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="TOML file with per-endpoint tokens, as for run.",
)
@handle_errors
def cancel(
    manifest: Path | None, db: DbLocation | None, token: str | None, config_file: Path | None
) -> None:
    """Cancel the run: withdraw its pending prompts from the servers' queues, interrupt its
    running ones (by prompt id only; other users' prompts are never touched), and mark its
    unfinished jobs cancelled. Stop a running `batch-runner run` first."""
    from batch_runner.cancel import cancel_run
    from batch_runner.config import endpoints_from_toml, load_toml

    tokens: dict[str, str | None] = defaultdict(lambda: token)
    if config_file is not None:
        listed = load_toml(config_file).get("endpoints", [])
        tokens.update({e.url: e.token for e in endpoints_from_toml(listed, config_file, 1)})
    sys.exit(_run_async(cancel_run(_db_for(manifest, db), tokens, Console())))


@main.command()
@manifest_arg
@db_option
@click.option(
    "--output",
    "-o",
    type=click.Path(dir_okay=False, path_type=Path),
    help="File to write (default: standard output).",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["csv", "jsonl"]),
    help="Default: from the --output extension, else csv.",
)
@handle_errors
def export(
    manifest: Path | None, db: DbLocation | None, output: Path | None, fmt: str | None
) -> None:
    """Write one row per job: inputs, resolved parameters, endpoint, output file, checksum,
    timings, attempts and last error. CSV cells are guarded against formula injection."""
    from batch_runner.status import export_results

    chosen = fmt or ("jsonl" if output and output.suffix in (".jsonl", ".ndjson") else "csv")
    sys.exit(_run_async(export_results(_db_for(manifest, db), output, chosen)))


@main.command()
@manifest_arg
@db_option
@click.option(
    "--output",
    "-o",
    type=click.Path(dir_okay=False, path_type=Path),
    help="HTML file to write (default: MANIFEST_STEM.report.html beside the run database).",
)
@handle_errors
def report(manifest: Path | None, db: DbLocation | None, output: Path | None) -> None:
    """Write one self-contained HTML page for reviewing the batch: summary numbers, failures
    grouped by reason, and per job the input thumbnail, prompt, seed, size, the video in a
    player, status, endpoint and timings. Opens offline; videos are linked relatively."""
    from batch_runner.report import make_report

    page = asyncio.run(make_report(_db_for(manifest, db), output))
    Console().print(f"report written to {page}", highlight=False)


@main.command()
@click.argument("manifest", type=click.Path(path_type=Path))
@click.option(
    "--endpoint",
    "-e",
    "endpoints",
    multiple=True,
    metavar="URL",
    help="Also check this ComfyUI server can run the workflow (repeat for several).",
)
@click.option(
    "--token",
    metavar="TOKEN",
    envvar="BATCH_RUNNER_TOKEN",
    show_envvar=True,
    help="Bearer token sent to every --endpoint.",
)
@click.option(
    "--config",
    "config_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="TOML file, as for run (its endpoints are checked too).",
)
@click.option(
    "--workflow",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Custom workflow (API or UI format) the rows must fit.",
)
@click.option("--bind", "binds", multiple=True, metavar="FIELD=NODE.INPUT")
@click.option("--preset", type=click.Choice(["480p", "720p"]), help="Resolution preset.")
@workflow_options
@handle_errors
def validate(
    manifest: Path,
    endpoints: tuple[str, ...],
    token: str | None,
    config_file: Path | None,
    workflow: Path | None,
    binds: tuple[str, ...],
    preset: str | None,
    lora_high: str | None,
    lora_low: str | None,
    fast4: bool,
    object_info: Path | None,
) -> None:
    """Check MANIFEST without sending any work: every problem with file, line and column.

    With endpoints (--endpoint or the config file), also check each one: it answers, accepts
    the token, has every node class and model file the workflows need. Exit 0 when all is
    ready, 1 when some endpoint is not (a run leaves it out), 2 when the manifest is invalid
    or no endpoint can run the workflows. A UI-format workflow is converted with the first
    answering endpoint's node schemas (or --object-info).
    """
    from batch_runner.validate import run_validate
    from batch_runner.workflows import load_workflows

    settings = _workflow_settings(
        manifest,
        config_file,
        workflow,
        binds,
        lora_high,
        lora_low,
        fast4,
        object_info,
        endpoints,
        token=token,
        preset=preset,
    )
    sys.exit(run_validate(settings, asyncio.run(load_workflows(settings)), Console()))


def _workflow_settings(
    manifest: Path,
    config_file: Path | None,
    workflow: Path | None,
    binds: Sequence[str],
    lora_high: str | None,
    lora_low: str | None,
    fast4: bool,
    object_info: Path | None,
    endpoints: Sequence[str],
    *,
    token: str | None = None,
    preset: str | None = None,
) -> RunSettings:
    """Settings for commands that look at workflows but run nothing."""
    return build_settings(
        manifest,
        config_file=config_file,
        endpoints=endpoints,
        token=token or os.environ.get("BATCH_RUNNER_TOKEN"),
        workflow=workflow,
        binds=binds,
        preset=preset,
        object_info=object_info,
        lora_high=lora_high,
        lora_low=lora_low,
        fast4=fast4,
    )


# ------------------------------------------------------------------------------------ workflow


@main.group()
def workflow() -> None:
    """Convert editor-format workflows and look at what a row will send."""


@workflow.command()
@click.argument("ui_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--output",
    "-o",
    type=click.Path(dir_okay=False, path_type=Path),
    help="API-format file to write (default: standard output).",
)
@click.option("--endpoint", "-e", metavar="URL", help="Server whose /object_info to use.")
@click.option(
    "--token",
    metavar="TOKEN",
    envvar="BATCH_RUNNER_TOKEN",
    show_envvar=True,
    help="Bearer token for --endpoint.",
)
@click.option(
    "--object-info",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Saved /object_info answer (instead of --endpoint).",
)
@handle_errors
def convert(
    ui_file: Path,
    output: Path | None,
    endpoint: str | None,
    token: str | None,
    object_info: Path | None,
) -> None:
    """Convert UI_FILE (saved from the ComfyUI editor) to API format, as the editor's
    "Export (API)" would, using a server's node schemas."""
    from batch_runner.config import normalise_url
    from batch_runner.workflow_tools import convert_file

    if (endpoint is None) == (object_info is None):
        raise click.UsageError("give either --endpoint URL or --object-info FILE")
    url = normalise_url(endpoint) if endpoint else None
    text = asyncio.run(convert_file(ui_file, url, token, object_info))
    if output is None:
        click.echo(text)
    else:
        output.write_text(text + "\n", encoding="utf-8")
        stderr.print(f"wrote {output}", highlight=False)


@workflow.command()
@click.argument("manifest", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--row", metavar="ID|LINE", help="The row's id, or its line (default: the first).")
@click.option(
    "--config",
    "config_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="TOML file, as for run.",
)
@click.option(
    "--workflow",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Custom workflow (API or UI format), as for run.",
)
@click.option("--bind", "binds", multiple=True, metavar="FIELD=NODE.INPUT")
@workflow_options
@click.option(
    "--endpoint",
    "-e",
    "endpoints",
    multiple=True,
    metavar="URL",
    help="Server whose /object_info converts UI-format workflows (nothing else is sent).",
)
@handle_errors
def show(
    manifest: Path,
    row: str | None,
    config_file: Path | None,
    workflow: Path | None,
    binds: tuple[str, ...],
    lora_high: str | None,
    lora_low: str | None,
    fast4: bool,
    object_info: Path | None,
    endpoints: tuple[str, ...],
) -> None:
    """Print the API graph one row of MANIFEST renders to, as it would be sent (the image
    under the name it is uploaded as)."""
    from batch_runner.workflow_tools import show_row
    from batch_runner.workflows import load_workflows

    settings = _workflow_settings(
        manifest, config_file, workflow, binds, lora_high, lora_low, fast4, object_info, endpoints
    )
    click.echo(show_row(manifest, asyncio.run(load_workflows(settings)), row))


# ------------------------------------------------------------------------------------ emulate


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8188, show_default=True, type=click.IntRange(0, 65535))
@click.option(
    "--step-ms",
    default=5.0,
    show_default=True,
    type=click.FloatRange(min=0),
    help="Emulated GPU time per sampler step.",
)
@click.option(
    "--speed",
    default=1.0,
    show_default=True,
    type=click.FloatRange(min=0.01),
    help="Speed factor (2 = twice as fast).",
)
@click.option(
    "--video-max-side",
    default=128,
    show_default=True,
    type=click.IntRange(min=16),
    help="Longest side of the videos written (kept small for speed).",
)
@click.option("--seed", default=0, show_default=True, help="Seed for every fault below.")
@click.option("--http-5xx-rate", default=0.0, type=click.FloatRange(0, 1))
@click.option("--latency-ms", default=0.0, type=click.FloatRange(min=0))
@click.option("--ws-drop-after", type=click.IntRange(min=1), help="Drop sockets after N frames.")
@click.option("--ws-drop-rate", default=0.0, type=click.FloatRange(0, 1))
@click.option(
    "--execution-error-rate",
    default=0.0,
    type=click.FloatRange(0, 1),
    help="Chance a prompt fails with CUDA out of memory.",
)
@click.option("--truncate-view-rate", default=0.0, type=click.FloatRange(0, 1))
@click.option("--crash-after", type=click.IntRange(min=1), help="Exit after N prompts.")
@handle_errors
def emulate(
    host: str,
    port: int,
    step_ms: float,
    speed: float,
    video_max_side: int,
    seed: int,
    http_5xx_rate: float,
    latency_ms: float,
    ws_drop_after: int | None,
    ws_drop_rate: float,
    execution_error_rate: float,
    truncate_view_rate: float,
    crash_after: int | None,
) -> None:
    """Serve an emulated ComfyUI (HTTP + websocket) for dry runs and tests. No GPU needed:
    it validates workflows like the real server and writes small real MP4s."""
    from batch_runner.emulator import EmulatorConfig, Faults, serve

    config = EmulatorConfig(
        host=host,
        port=port,
        step_ms=step_ms,
        speed=speed,
        video_max_side=video_max_side,
        exit_on_crash=True,
        faults=Faults(
            seed=seed,
            http_5xx_rate=http_5xx_rate,
            latency_ms=latency_ms,
            ws_drop_after_frames=ws_drop_after,
            ws_drop_rate=ws_drop_rate,
            execution_error_rate=execution_error_rate,
            truncate_view_rate=truncate_view_rate,
            crash_after_prompts=crash_after,
        ),
    )

    def ready(url: str) -> None:
        click.echo(f"emulated ComfyUI listening on {url}", err=False)
        sys.stdout.flush()

    with suppress(KeyboardInterrupt):
        asyncio.run(serve(config, ready=ready))
