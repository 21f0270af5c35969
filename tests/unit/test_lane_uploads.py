"""A lane's memory of what it uploaded: when it asks the store, and when it need not."""

from __future__ import annotations

from collections.abc import Awaitable

import pytest

from batch_runner import lane as lane_mod
from batch_runner.config import EndpointSettings
from batch_runner.lane import Lane
from batch_runner.store import EndpointRecord


class UploadingClient:
    def __init__(self) -> None:
        self.uploaded: list[str] = []

    async def upload_image(self, data: bytes, filename: str) -> str:
        self.uploaded.append(filename)
        return filename

    async def aclose(self) -> None:
        pass


class Recorded:
    """The store's side: what it was asked, and what it remembers."""

    def __init__(self, names: dict[str, str]) -> None:
        self.names = dict(names)
        self.asked: list[str] = []

    async def read(self) -> bytes:
        return b"image"

    def upload(self, lane: Lane, sha256: str) -> Awaitable[str]:
        async def known() -> str | None:
            self.asked.append(sha256)
            return self.names.get(sha256)

        async def remember(name: str) -> None:
            self.names[sha256] = name

        return lane.upload(
            read=self.read, sha256=sha256, filename=f"{sha256}.png", known=known, remember=remember
        )


def new_lane(client: UploadingClient) -> Lane:
    record = EndpointRecord(1, "http://127.0.0.1:1", "c")
    return Lane(
        EndpointSettings("http://127.0.0.1:1"),
        record,
        endpoint_timeout=1.0,
        client=client,  # type: ignore[arg-type]
    )


async def test_a_lane_that_knows_every_recorded_upload_asks_the_store_nothing() -> None:
    client, store = UploadingClient(), Recorded({"old": "old.png"})
    lane = new_lane(client)
    lane.knows_uploads(store.names)
    assert await store.upload(lane, "old") == "old.png"
    assert await store.upload(lane, "new") == "new.png"
    assert await store.upload(lane, "new") == "new.png"
    assert store.asked == [] and client.uploaded == ["new.png"]


async def test_once_it_forgets_one_a_lane_asks_the_store_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(lane_mod, "UPLOADS_REMEMBERED", 2)
    client, store = UploadingClient(), Recorded({})
    lane = new_lane(client)
    lane.knows_uploads({})
    for sha256 in ("a", "b", "c"):  # the third pushes "a" out of the lane's memory
        await store.upload(lane, sha256)
    assert store.asked == []
    assert await store.upload(lane, "a") == "a.png"
    assert store.asked == ["a"] and client.uploaded == ["a.png", "b.png", "c.png"]


async def test_without_the_stores_list_a_lane_asks_before_uploading() -> None:
    client, store = UploadingClient(), Recorded({"old": "old.png"})
    lane = new_lane(client)
    assert await store.upload(lane, "old") == "old.png"
    assert store.asked == ["old"] and client.uploaded == []
