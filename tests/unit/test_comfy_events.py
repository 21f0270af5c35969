"""Websocket event parsing against every text frame recorded from the real server."""

from __future__ import annotations

import json
from typing import Any

import pytest

from batch_runner.comfy import events as ev
from batch_runner.comfy.events import parse_message
from batch_runner.comfy.models import OutputFile
from tests.helpers import TRACES

EXPECTED: dict[str, type | None] = {
    "status": ev.Status,
    "execution_start": ev.ExecutionStart,
    "execution_cached": ev.ExecutionCached,
    "executing": ev.Executing,
    "progress": ev.Progress,
    "executed": ev.Executed,
    "execution_success": ev.ExecutionSuccess,
    "execution_error": ev.ExecutionError,
    "execution_interrupted": ev.ExecutionInterrupted,
    "progress_state": None,
    "feature_flags": None,
}


def _recorded_frames() -> list[Any]:
    params = []
    for trace in sorted(TRACES.glob("*.json")):
        sockets = json.loads(trace.read_text()).get("websockets") or {}
        for socket_name, socket in sockets.items():
            for index, frame in enumerate(socket["messages"]):
                if frame["frame"] == "text":
                    ident = f"{trace.stem}:{socket_name}:{index}"
                    params.append(pytest.param(frame["msg"], id=ident))
    return params


FRAMES = _recorded_frames()


def test_the_traces_are_there() -> None:
    assert len(FRAMES) > 1000


@pytest.mark.parametrize("msg", FRAMES)
def test_every_recorded_frame_parses_to_its_type(msg: dict[str, Any]) -> None:
    # json.dumps with default separators is byte-for-byte what ComfyUI sends.
    event = parse_message(json.dumps(msg))
    expected = EXPECTED[msg["type"]]
    if expected is None:
        assert event is None
        return
    assert isinstance(event, expected)
    data = msg["data"]
    assert getattr(event, "prompt_id", None) == data.get("prompt_id")


def test_status_with_and_without_sid() -> None:
    first = (
        '{"type": "status", "data": {"status": {"exec_info": {"queue_remaining": 2}}, "sid": "c1"}}'
    )
    later = '{"type": "status", "data": {"status": {"exec_info": {"queue_remaining": 0}}}}'
    assert parse_message(first) == ev.Status(2, "c1")
    assert parse_message(later) == ev.Status(0, None)


def test_executing_end_and_reconnect_hint() -> None:
    end = '{"type": "executing", "data": {"node": null, "prompt_id": "p"}}'
    hint = '{"type": "executing", "data": {"node": "6"}}'
    assert parse_message(end) == ev.Executing("p", None)
    assert parse_message(hint) == ev.Executing(None, "6")


def test_executed_savevideo_output_is_animated() -> None:
    text = json.dumps(
        {
            "type": "executed",
            "data": {
                "node": "61",
                "display_node": "61",
                "prompt_id": "p",
                "output": {
                    "images": [
                        {"filename": "ComfyUI_00001_.mp4", "subfolder": "video", "type": "output"}
                    ],
                    "animated": [True],
                },
            },
        }
    )
    assert parse_message(text) == ev.Executed(
        "p", "61", (OutputFile("ComfyUI_00001_.mp4", "video", "output", "61", True),)
    )


def test_execution_error_and_interrupt_fields() -> None:
    error = json.dumps(
        {
            "type": "execution_error",
            "data": {
                "prompt_id": "p",
                "node_id": "39",
                "node_type": "VAELoader",
                "exception_type": "safetensors._safetensors_rust.SafetensorError",
                "exception_message": "Error while deserializing header: header too large\n",
                "traceback": [],
                "executed": [],
            },
        }
    )
    event = parse_message(error)
    assert isinstance(event, ev.ExecutionError)
    assert event.info.node_type == "VAELoader"
    assert event.info.exception_message.startswith("Error while deserializing")
    interrupted = (
        '{"type": "execution_interrupted", "data": {"prompt_id": "p", "node_id": "6",'
        ' "node_type": "ImageUpscaleWithModel", "executed": []}}'
    )
    assert parse_message(interrupted) == ev.ExecutionInterrupted("p", "6", "ImageUpscaleWithModel")


@pytest.mark.parametrize(
    "text",
    [
        "",
        "not json",
        "null",
        "[1, 2]",
        '{"type": 3, "data": {}}',
        '{"type": "executing"}',
        '{"type": "executing", "data": []}',
        '{"type": "progress", "data": {"prompt_id": "p", "node": "1", "value": "x", "max": 2}}',
        '{"type": "progress", "data": {"prompt_id": "p", "node": "1", "value": true, "max": 2}}',
        '{"type": "execution_start", "data": {"prompt_id": null}}',
        '{"type": "executed", "data": {"prompt_id": "p", "node": "4", "output": {"images": 5}}}',
        '{"type": "execution_error", "data": {"prompt_id": "p", "node_id": {"x": 1}}}',
        '{"type": "status", "data": {"status": "busy"}}',
        '{"type": "something_new", "data": {"prompt_id": "p"}}',
        "[" * 100_000,
    ],
)
def test_malformed_or_unknown_frames_give_none(text: str) -> None:
    assert parse_message(text) is None
