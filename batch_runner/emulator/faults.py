"""Seeded random decisions for the fault knobs."""

from __future__ import annotations

import random

from batch_runner.emulator.config import Faults

_KNOBS = ("http", "drop_response", "ws", "ws_deaf", "execution", "view")


class Dice:
    """One generator per knob, each seeded from Faults.seed, so runs are reproducible."""

    def __init__(self, faults: Faults) -> None:
        self.faults = faults
        self._rngs = {knob: random.Random(f"{faults.seed}:{knob}") for knob in _KNOBS}

    def roll(self, knob: str, rate: float) -> bool:
        if rate <= 0.0:
            return False
        return self._rngs[knob].random() < rate

    def pick(self, knob: str, choices: tuple[int, ...]) -> int:
        return self._rngs[knob].choice(choices)
