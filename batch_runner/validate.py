"""``batch-runner validate``: the manifest check, then a preflight table of every endpoint."""

from __future__ import annotations

import asyncio
from collections import defaultdict

from rich.console import Console
from rich.table import Table

from batch_runner.config import RunSettings
from batch_runner.errors import ManifestError
from batch_runner.preflight import EndpointCheck, PreflightFailed, check_endpoints
from batch_runner.workflows import TemplateBook

EXIT_OK, EXIT_SOME_NOT_READY = 0, 1


def _mark(ok: bool | None) -> str:
    return "—" if ok is None else "[green]yes[/]" if ok else "[red]no[/]"


def endpoint_table(checks: list[EndpointCheck]) -> Table:
    """One row per endpoint: each check passed or not, and the verdict."""
    table = Table("endpoint", "answers", "token", "nodes", "models", "verdict", title="endpoints")
    for c in checks:
        asked = c.reachable and c.token_accepted and not c.error
        table.add_row(
            c.url,
            _mark(c.reachable),
            _mark(c.token_accepted if c.reachable else None),
            _mark(not c.missing_nodes if asked else None),
            _mark(not c.missing_models if asked else None),
            "[green]ready[/]" if c.ready else f"[red]{_escape(c.verdict())}[/]",
        )
    return table


def missing_table(checks: list[EndpointCheck]) -> Table | None:
    """What is missing where: one row per missing node class or model file."""
    where: dict[tuple[str, str, str], list[str]] = defaultdict(list)
    for c in checks:
        for cls in c.missing_nodes:
            where[("node class", cls, "")].append(c.url)
        for m in c.missing_models:
            where[("model file", m.where, m.needed_by)].append(c.url)
    if not where:
        return None
    table = Table("kind", "missing", "needed by", "missing on", title="what is missing where")
    for (kind, name, needed_by), urls in sorted(where.items()):
        table.add_row(kind, _escape(name), needed_by, "\n".join(urls))
    return table


def _escape(text: str) -> str:
    # File names and server messages may contain "[", which rich would read as markup.
    return text.replace("[", "\\[")


def print_checks(checks: list[EndpointCheck], console: Console) -> None:
    """The endpoint table, then what is missing where (when anything is)."""
    console.print(endpoint_table(checks))
    missing = missing_table(checks)
    if missing is not None:
        console.print(missing)
    ready = sum(c.ready for c in checks)
    console.print(f"{ready} of {len(checks)} endpoint(s) can run this workflow", highlight=False)


def run_validate(settings: RunSettings, book: TemplateBook, console: Console) -> int:
    """The whole command: the manifest (every problem listed), then each endpoint.

    Returns 0 when everything is ready, 1 when some endpoint cannot run the workflow (a run
    would leave it out); raises for an invalid manifest or when no endpoint can run it.
    """
    from batch_runner.runner import check_manifest

    good, problems = check_manifest(settings.manifest, book)
    console.print(f"{settings.manifest}: {good} valid row(s)", highlight=False)
    # After the manifest check: the book now holds every workflow the rows name.
    checks = asyncio.run(check_endpoints(settings.endpoints, book.templates()))
    if checks:
        print_checks(checks, console)
    if problems:
        raise ManifestError(problems)
    if checks and not any(c.ready for c in checks):
        raise PreflightFailed(
            "no endpoint can run this workflow; the tables above say what is missing where. "
            "Fix the servers (or the URLs, or the token) and validate again."
        )
    return EXIT_OK if all(c.ready for c in checks) else EXIT_SOME_NOT_READY
