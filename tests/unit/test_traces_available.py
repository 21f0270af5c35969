"""The recorded traces must be there: trace-driven tests would otherwise pass with no cases."""

from __future__ import annotations

from tests.helpers import TRACES


def test_recorded_traces_are_present() -> None:
    assert TRACES.is_dir(), f"expected the recorded ComfyUI traces at {TRACES}"
    assert len(list(TRACES.glob("*.json"))) >= 27
