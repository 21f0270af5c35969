"""The review page's HTML, read without a browser: escaping, links, grouping, numbers."""

from __future__ import annotations

from html.parser import HTMLParser
from pathlib import Path
from typing import Any

from batch_runner.report import Summary, render_failures, render_row, render_summary, thumbnail
from tests.helpers import make_image

HOSTILE = '<script>alert("x")</script> & <img src=x onerror=alert(1)>'


class Tags(HTMLParser):
    """Every start tag with its attributes, and the page's text."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def parse(html: str) -> Tags:
    tags = Tags()
    tags.feed(html)
    return tags


def record(**changes: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "job_id": "j1",
        "line": 2,
        "state": "succeeded",
        "image": None,
        "prompt": "a cat",
        "seed": 42,
        "width": 832,
        "height": 480,
        "frames": 81,
        "fps": 16.0,
        "endpoint": "http://gpu1:8188",
        "prompt_id": "p",
        "output_path": None,
        "submitted_at": 1_700_000_000.0,
        "started_at": 1_700_000_001.0,
        "finished_at": 1_700_000_091.0,
        "duration_s": 90.0,
        "attempts": 1,
        "error_kind": None,
        "last_error": None,
    }
    return {**base, **changes}


def test_user_text_is_escaped_everywhere(tmp_path: Path) -> None:
    row = render_row(
        record(job_id=HOSTILE, prompt=HOSTILE, last_error=HOSTILE, endpoint=HOSTILE),
        None,
        tmp_path,
    )
    page = parse(row)
    assert {tag for tag, _ in page.tags} <= {"tr", "td", "br", "small"}
    assert "".join(page.text).count('<script>alert("x")</script>') == 4


def test_video_link_is_relative_to_the_page_and_percent_encoded(tmp_path: Path) -> None:
    video = tmp_path / "outputs" / "run" / "clip #1?.mp4"
    page = parse(render_row(record(output_path=str(video)), None, tmp_path))
    sources = [attrs["src"] for tag, attrs in page.tags if tag == "video"]
    assert sources == ["outputs/run/clip%20%231%3F.mp4"]
    assert ("video", {"controls": None, "preload": "metadata", "src": sources[0]}) in page.tags


def test_failed_job_shows_no_player_but_its_error() -> None:
    html = render_row(record(state="failed", last_error="node 37 missing"), None, Path("/"))
    assert "<video" not in html and "node 37 missing" in html


def test_thumbnail_is_a_small_jpeg_data_uri_and_missing_images_are_tolerated(
    tmp_path: Path,
) -> None:
    uri = thumbnail(str(make_image(tmp_path / "big.png", (1280, 720))))
    assert uri is not None and uri.startswith("data:image/jpeg;base64,")
    assert len(uri) < 20_000
    assert thumbnail(str(tmp_path / "gone.png")) is None


def test_failures_are_grouped_by_reason_most_common_first() -> None:
    summary = Summary()
    for i in range(3):
        summary.add(record(job_id=f"oom{i}", state="failed", error_kind="X", last_error="OOM"))
    summary.add(record(job_id="m", state="failed", error_kind="Y", last_error="no model"))
    summary.add(record(job_id="ok", duration_s=30.0))
    rows = [r for r in render_failures(summary.failures).split("<tr>") if "<td>" in r]
    assert rows[0].startswith("<td>3<td>X") and "oom0, oom1, oom2" in rows[0]
    assert rows[1].startswith("<td>1<td>Y")
    text = "".join(parse(render_summary("/data/jobs.csv", summary)).text)
    assert "5jobs" in text and "1succeeded" in text and "4failed" in text
    assert "30smedian time per video" in text
