"""Seeds for rows that do not give one."""

from __future__ import annotations

import hashlib

#: Derived seeds stay below 2**53 so they survive any JSON client that reads numbers as doubles.
DERIVED_SEED_LIMIT = 2**53


def derive_seed(job_id: str) -> int:
    """Return a seed in ``[0, 2**53)`` that depends only on ``job_id``.

    A job keeps its seed across retries, resumes and endpoints, so a re-rendered
    clip is the same clip.
    """
    digest = hashlib.sha256(job_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % DERIVED_SEED_LIMIT
