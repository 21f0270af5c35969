"""Blocking work handed to a thread and seen through to its end, even when its caller is
cancelled."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Any, TypeVar

T = TypeVar("T")


async def run_to_the_end(fn: Callable[..., T], *args: Any, executor: Executor | None = None) -> T:
    """Run ``fn(*args)`` in ``executor`` (the loop's default one when None), off the loop.

    When the caller is cancelled meanwhile, the cancellation goes on only once ``fn`` has
    returned: what it works on (an open file, a folder being removed, a connection the
    next caller takes) must not be closed or reused under it.
    """
    future = asyncio.get_running_loop().run_in_executor(executor, fn, *args)
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        while not future.done():
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait([future])
        raise
