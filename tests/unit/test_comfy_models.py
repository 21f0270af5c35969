"""History and queue parsing (recorded answers), error summaries and error classification."""

from __future__ import annotations

import json
from typing import Any

import pytest

from batch_runner.comfy.failures import classify_execution_error, summarise_rejection
from batch_runner.comfy.models import (
    ExecutionErrorInfo,
    Outcome,
    OutputFile,
    ProtocolViolation,
    parse_history_entry,
    parse_outputs,
    parse_queue,
)
from batch_runner.errors import ExecutionFailed, ExecutionTransient
from tests.helpers import TRACES


def _answers(method: str, path_prefix: str, status: int = 200) -> list[tuple[str, Any]]:
    found = []
    for trace in sorted(TRACES.glob("*.json")):
        for event in json.loads(trace.read_text()).get("events", []):
            if event.get("kind") != "http":
                continue
            request, response = event["request"], event["response"]
            if (
                request["method"] == method
                and request["path"].lstrip("/").removeprefix("api/").startswith(path_prefix)
                and response["status"] == status
                and "json" in response
                and response["json"] != "<omitted>"  # the recorder left some big answers out
            ):
                found.append((f"{trace.stem}:{request['path']}", response["json"]))
    return found


HISTORY = [
    pytest.param(pid, entry, id=f"{where}:{pid[:8]}")
    for where, answer in _answers("GET", "history")
    for pid, entry in answer.items()
]


def test_the_traces_hold_history_entries() -> None:
    assert len(HISTORY) > 50


def _expected_outcome(entry: dict[str, Any]) -> Outcome:
    kinds = [m[0] for m in entry["status"]["messages"]]
    if "execution_interrupted" in kinds:
        return Outcome.INTERRUPTED
    if "execution_error" in kinds:
        return Outcome.ERROR
    return Outcome.SUCCESS


@pytest.mark.parametrize(("prompt_id", "entry"), HISTORY)
def test_every_recorded_history_entry_parses(prompt_id: str, entry: dict[str, Any]) -> None:
    parsed = parse_history_entry(prompt_id, entry)
    assert parsed.outcome is _expected_outcome(entry)
    assert (parsed.error is not None) == (parsed.outcome is Outcome.ERROR)
    listed = sum(len(o.get("images", [])) for o in entry["outputs"].values())
    assert len(parsed.outputs) == listed


def test_savevideo_entry_reports_an_animated_file() -> None:
    trace = json.loads((TRACES / "01_success_model_free.json").read_text())
    prompt_id = trace["prompt_id"]
    answers = [a for _, a in _answers("GET", f"history/{prompt_id}") if a]
    entry = parse_history_entry(prompt_id, answers[0][prompt_id])
    assert entry.outcome is Outcome.SUCCESS
    assert entry.outputs == (OutputFile("test_00001_.mp4", "video", "output", "4", True),)


def test_error_entry_carries_the_exception() -> None:
    trace = json.loads((TRACES / "05_wan22_placeholder_models.json").read_text())
    prompt_id = trace["prompt_id"]
    answers = [a for _, a in _answers("GET", f"history/{prompt_id}") if a]
    entry = parse_history_entry(prompt_id, answers[0][prompt_id])
    assert entry.outcome is Outcome.ERROR
    assert entry.error is not None
    assert (entry.error.node_id, entry.error.node_type) == ("39", "VAELoader")
    assert entry.error.exception_type == "safetensors._safetensors_rust.SafetensorError"


def test_other_node_packs_output_keys() -> None:
    outputs = {
        "9": {"gifs": [{"filename": "a.mp4", "subfolder": "", "type": "output"}]},
        "10": {"videos": [{"filename": "b.webm", "subfolder": "x", "type": "output"}]},
        "11": {"images": [{"filename": "c.png", "subfolder": "", "type": "temp"}]},
        "12": {"text": ["not a file"]},
    }
    files = parse_outputs(outputs)
    assert [(f.filename, f.animated) for f in files] == [
        ("a.mp4", True),
        ("b.webm", True),
        ("c.png", False),
    ]


@pytest.mark.parametrize(
    "entry",
    [
        "nope",
        {},
        {"status": {"status_str": 1}},
        {"status": {"status_str": "success", "messages": "x"}},
        {"status": {"status_str": "error", "messages": [["execution_error"]]}},
        {"status": {"status_str": "success"}, "outputs": {"4": {"images": [{"subfolder": ""}]}}},
        {"status": {"status_str": "success"}, "outputs": []},
    ],
)
def test_malformed_history_entries_are_protocol_violations(entry: Any) -> None:
    with pytest.raises(ProtocolViolation):
        parse_history_entry("p", entry)


def test_queue_pending_is_sorted_by_number() -> None:
    answer = {
        "queue_running": [[0, "A", {}, {}, []]],
        "queue_pending": [[3, "C", {}, {}, []], [-100.0, "E", {}, {}, []], [2, "B", {}, {}, []]],
    }
    snapshot = parse_queue(answer)
    assert snapshot.running == ("A",)
    assert snapshot.pending == ("E", "B", "C")


@pytest.mark.parametrize("where_answer", _answers("GET", "queue"), ids=lambda w: w[0])
def test_every_recorded_queue_answer_parses(where_answer: tuple[str, Any]) -> None:
    answer = where_answer[1]
    snapshot = parse_queue(answer)
    assert len(snapshot.running) == len(answer["queue_running"])
    assert len(snapshot.pending) == len(answer["queue_pending"])


@pytest.mark.parametrize(
    "answer",
    [
        [],
        {"queue_running": []},
        {"queue_running": "x", "queue_pending": []},
        {"queue_running": [[0]], "queue_pending": []},
        {"queue_running": [[True, "a"]], "queue_pending": []},
        {"queue_running": [], "queue_pending": [[1, 2]]},
    ],
)
def test_malformed_queue_answers_are_protocol_violations(answer: Any) -> None:
    with pytest.raises(ProtocolViolation):
        parse_queue(answer)


def test_rejection_summary_names_node_input_and_kind() -> None:
    bodies = [body for _, body in _answers("POST", "prompt", status=400)]
    unet = next(b for b in bodies if "37" in b["node_errors"])
    summary = summarise_rejection(unet)
    assert summary.startswith(
        "node 37 UNETLoader: unet_name: 'wan2.2_i2v_high_noise_14B_fp16.safetensors' not in"
    )
    assert summary.endswith("(value_not_in_list)")
    assert "\n" not in summary


@pytest.mark.parametrize(("where", "body"), _answers("POST", "prompt", status=400))
def test_every_recorded_rejection_summarises_in_one_line(where: str, body: Any) -> None:
    summary = summarise_rejection(body)
    assert "\n" not in summary
    assert f"({body['error']['type']})" in summary or all(
        f"node {n} " in summary for n in body["node_errors"]
    )


def test_rejection_summary_examples() -> None:
    missing = {
        "error": {"type": "prompt_outputs_failed_validation", "message": "m", "details": ""},
        "node_errors": {
            "3": {
                "errors": [
                    {
                        "type": "required_input_missing",
                        "message": "Required input is missing",
                        "details": "fps",
                        "extra_info": {"input_name": "fps"},
                    }
                ],
                "class_type": "CreateVideo",
            }
        },
    }
    assert summarise_rejection(missing) == (
        "node 3 CreateVideo: fps: Required input is missing (required_input_missing)"
    )
    no_outputs = {"error": {"type": "prompt_no_outputs", "message": "Prompt has no outputs"}}
    assert summarise_rejection(no_outputs) == "Prompt has no outputs (prompt_no_outputs)"
    assert summarise_rejection("junk") == "the server rejected the workflow"


@pytest.mark.parametrize(
    ("exception_type", "message", "expected"),
    [
        ("torch.OutOfMemoryError", "Allocation on device", ExecutionTransient),
        (
            "torch.cuda.OutOfMemoryError",
            "CUDA out of memory. Tried to allocate",
            ExecutionTransient,
        ),
        (
            "RuntimeError",
            "CUDA error: an illegal memory access was encountered",
            ExecutionTransient,
        ),
        ("RuntimeError", "Allocation on device 0 would exceed allowed memory", ExecutionTransient),
        ("PIL.UnidentifiedImageError", "cannot identify image file '/x.png'\n", ExecutionFailed),
        ("ValueError", "'webm' is not a valid VideoContainer\n", ExecutionFailed),
        ("safetensors._safetensors_rust.SafetensorError", "header too large\n", ExecutionFailed),
        ("FileNotFoundError", "No such file", ExecutionFailed),
    ],
)
def test_execution_errors_are_classified(exception_type: str, message: str, expected: type) -> None:
    info = ExecutionErrorInfo("57", "KSamplerAdvanced", exception_type, message)
    assert classify_execution_error(info) is expected
