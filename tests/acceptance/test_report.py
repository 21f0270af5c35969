"""The review report from the command line, rendered by a real headless Chromium."""

from __future__ import annotations

import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image

from tests.acceptance.conftest import cli
from tests.helpers import make_image, write_csv

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
HOSTILE = 'a fox <script>document.title="owned"</script> & "friends"'


def _batch(tmp_path: Path) -> None:
    make_image(tmp_path / "a.png", (96, 64))
    make_image(tmp_path / "b.png", (64, 96), colour="lime")
    rows = [
        {"id": "fox", "image": "a.png", "prompt": HOSTILE, "frames": 5},
        {"id": "owl", "image": "b.png", "prompt": "an owl", "frames": 5},
        # The server lacks this model: the job fails permanently with the server's reason.
        {"id": "bad", "image": "a.png", "prompt": "x", "frames": 5, "node.37.unet_name": "no.gguf"},
    ]
    write_csv(tmp_path / "jobs.csv", rows)


def _chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    assert CHROMIUM is not None
    return subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            f"--user-data-dir={tmp_path / 'chromium-profile'}",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=90,
        stdin=subprocess.DEVNULL,
    )


class Dom(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.title = ""
        self._in_title = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))
        self._in_title = tag == "title"

    def handle_data(self, data: str) -> None:
        if self._in_title:
            self.title += data


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed")
def test_report_renders_offline_in_chromium(tmp_path: Path) -> None:
    _batch(tmp_path)
    ran = cli("run", "jobs.csv", "--emulate", "1", cwd=tmp_path)
    assert ran.returncode == 1, ran.stderr  # one job failed on purpose
    made = cli("report", "jobs.csv", "-o", "review/report.html", cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    page = tmp_path / "review" / "report.html"

    dumped = _chromium(tmp_path, "--dump-dom", page.as_uri())
    assert dumped.returncode == 0, dumped.stderr[-2000:]
    dom = Dom()
    dom.feed(dumped.stdout)
    assert dom.title == "Batch report: jobs.csv", "no script ran and changed the title"
    assert not any(tag == "script" for tag, _ in dom.tags)
    jobs = [a for tag, a in dom.tags if tag == "tr" and a.get("class") == "job"]
    assert [a["id"] for a in jobs] == ["job-fox", "job-owl", "job-bad"]
    videos = [a["src"] for tag, a in dom.tags if tag == "video"]
    assert len(videos) == 2
    for src in videos:
        assert src is not None and not src.startswith(("/", "file:", "http"))
        assert (page.parent / src).is_file(), "relative links reach the videos"
    thumbs = [a["src"] for tag, a in dom.tags if tag == "img"]
    assert len(thumbs) == 3 and all(s and s.startswith("data:image/jpeg") for s in thumbs)
    assert "no.gguf" in dumped.stdout and "Failures by reason" in dumped.stdout

    shot = tmp_path / "shot.png"
    painted = _chromium(tmp_path, "--window-size=1280,900", f"--screenshot={shot}", page.as_uri())
    assert painted.returncode == 0 and shot.is_file(), painted.stderr[-2000:]
    with Image.open(shot) as image:
        colours = image.convert("RGB").getcolors(maxcolors=1_000_000)
    assert colours is not None and len(colours) > 50, "the page painted text and images"
