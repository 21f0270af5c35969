"""Run order and cache keys of a validated graph.

Run order, as the real server chooses it (reproduces traces 01, 06, 11 and the Wan2.2
order of 05b/14): starting from each output node, nodes are collected depth-first with an
explicit stack (a node's linked inputs are pushed in input order, so the last input is
visited first), skipping cached nodes. Then, repeatedly, among the collected nodes whose
inputs are all done, in collection order, the first that is an output node runs; else the
first that feeds an output node; else the first two links away from one; else the first.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from typing import Any

from batch_runner.emulator import schemas

Prompt = dict[str, dict[str, Any]]


def links(prompt: Prompt, node_id: str) -> list[tuple[str, str, int]]:
    """(input name, source node id, source slot) for each linked input of a node."""
    node = prompt[node_id]
    linkable = {name for name, _, _ in schemas.input_spec(node["class_type"])}
    found = []
    for name, value in node["inputs"].items():
        if name in linkable and isinstance(value, list) and len(value) == 2:
            found.append((name, str(value[0]), int(value[1])))
    return found


def run_order(prompt: Prompt, outputs: list[str], cached: set[str]) -> Iterator[str]:
    """Yield node ids in the order the real server runs them (cached outputs included)."""
    pending: dict[str, None] = {}
    waiting_on: dict[str, set[str]] = {}
    feeds: dict[str, set[str]] = {}
    for output in outputs:
        stack = [output]
        while stack:
            node_id = stack.pop()
            if node_id in pending:
                continue
            pending[node_id] = None
            waiting_on.setdefault(node_id, set())
            for _, source, _ in links(prompt, node_id):
                if source in cached:
                    continue
                stack.append(source)
                waiting_on[node_id].add(source)
                feeds.setdefault(source, set()).add(node_id)

    def is_output(node_id: str) -> bool:
        return schemas.is_output_node(prompt[node_id]["class_type"])

    def near_output(node_id: str, hops: int) -> bool:
        frontier = {node_id}
        for _ in range(hops):
            frontier = {nxt for cur in frontier for nxt in feeds.get(cur, ())}
        return any(is_output(n) for n in frontier)

    rules: list[Callable[[str], bool]] = [
        is_output,
        lambda n: near_output(n, 1),
        lambda n: near_output(n, 2),
    ]
    while pending:
        ready = [n for n in pending if not waiting_on[n]]
        chosen = next((n for rule in rules for n in ready if rule(n)), ready[0])
        del pending[chosen]
        yield chosen
        for consumer in feeds.get(chosen, ()):
            waiting_on[consumer].discard(chosen)


class Signatures:
    """Cache keys: a node's class and inputs, with links replaced by their source's key."""

    def __init__(self, prompt: Prompt, extra: Callable[[str], str | None]) -> None:
        self._prompt = prompt
        self._extra = extra
        self._memo: dict[str, str] = {}

    def __call__(self, node_id: str) -> str:
        found = self._memo.get(node_id)
        if found is not None:
            return found
        node = self._prompt[node_id]
        linked = {name: (source, slot) for name, source, slot in links(self._prompt, node_id)}
        parts: dict[str, Any] = {}
        for name, value in node["inputs"].items():
            if name in linked:
                source, slot = linked[name]
                parts[name] = ["link", self(source), slot]
            else:
                parts[name] = value
        material = json.dumps(
            [node["class_type"], parts, self._extra(node_id)], sort_keys=True, default=str
        )
        found = hashlib.sha256(material.encode()).hexdigest()
        self._memo[node_id] = found
        return found
