"""`batch-runner cancel`: take this run's prompts off the servers, then cancel its jobs.

Only prompt ids this run recorded are touched: pending ones are deleted from the queue,
running ones interrupted by id (never the global interrupt), so other users' work on the
same servers is left alone.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Mapping

from rich.console import Console

from batch_runner.comfy.client import ComfyClient
from batch_runner.comfy.config import Endpoint
from batch_runner.errors import EndpointError, InputError
from batch_runner.status import require_db
from batch_runner.store import Store
from batch_runner.store.location import DbLocation

log = logging.getLogger(__name__)


async def cancel_run(db: DbLocation, tokens: Mapping[str, str | None], console: Console) -> int:
    require_db(db)
    async with Store.open(db) as store:
        run = await store.only_run()
        if run is None:
            raise InputError(f"{db} holds no run yet")
        urls = {e.id: e.url for e in await store.endpoints_of(run.id)}
        prompts: dict[str, list[str]] = defaultdict(list)
        for _job, attempt in await store.in_flight(run.id):
            prompts[urls[attempt.endpoint_id]].append(attempt.prompt_id)
        unreachable = []
        for url, ids in prompts.items():
            async with ComfyClient(Endpoint(url, token=tokens.get(url))) as client:
                try:
                    # Delete first, so nothing pending starts after the interrupts.
                    await client.delete_pending(ids)
                    for prompt_id in ids:
                        await client.interrupt(prompt_id)
                except EndpointError as exc:
                    unreachable.append(url)
                    log.warning(
                        "could not reach %s to withdraw %d prompt(s): %s", url, len(ids), exc
                    )
        cancelled = await store.cancel_all(run.id, "cancelled by the user")
    withdrawn = sum(len(ids) for url, ids in prompts.items() if url not in unreachable)
    console.print(
        f"{cancelled} job(s) cancelled; {withdrawn} prompt(s) withdrawn from the servers"
        + (f"; unreachable: {', '.join(unreachable)}" if unreachable else "")
        + ". `batch-runner retry` sends cancelled jobs back to pending."
    )
    return 0
