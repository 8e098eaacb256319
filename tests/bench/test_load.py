"""bench/load.py's request bodies: what wrk sends (bench/multipart.lua for one image,
bench/prepared.lua for a body built here), read back by the service's own multipart parser."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from typing import Any, ClassVar

import psutil
import pytest
from pydantic import BaseModel, ConfigDict
from starlette.applications import Starlette
from starlette.datastructures import UploadFile
from starlette.requests import Request

from bench import load
from bench.load import BOUNDARY, multipart_body, write_body
from serving.uploads import FilesOnlyMultipartSerde
from tests.helpers import http_scope

IMAGE = b"\xff\xd8\xff\xe0 not really a JPEG, with \r\n--and a dash line\r\n inside \xff\xd9"


class Upload(BaseModel):
    """/classify's input as BentoML's serde sees it."""

    model_config = ConfigDict(arbitrary_types_allowed=True)
    multipart_fields: ClassVar[set[str]] = {"images"}
    images: list[UploadFile]


def parse(header: str, body: bytes) -> list[tuple[str | None, str | None, bytes]]:
    """(filename, content type, bytes) of each file the service would read from the body."""
    scope = http_scope(headers={"content-type": header, "content-length": str(len(body))})
    scope["app"] = Starlette()

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    async def files() -> list[tuple[str | None, str | None, bytes]]:
        upload = await FilesOnlyMultipartSerde().parse_request(Request(scope, receive), Upload)
        return [(f.filename, f.content_type, await f.read()) for f in upload.images]

    return asyncio.run(files())


@pytest.mark.parametrize("count", [1, 8, 32])
def test_a_body_of_n_images_is_read_back_as_n_files_in_order(count: int) -> None:
    header, body = multipart_body(IMAGE, count)
    files = parse(header, body)
    assert len(files) == count, f"{count} parts sent, {len(files)} read back"
    assert all(f == ("upload.jpg", "image/jpeg", IMAGE) for f in files), files[:2]


def test_a_png_body_names_its_parts_as_png() -> None:
    header, body = multipart_body(b"\x89PNG...", 2, content_type="image/png")
    assert parse(header, body) == [("upload.png", "image/png", b"\x89PNG...")] * 2


def test_one_image_is_byte_for_byte_what_multipart_lua_sends() -> None:
    """multipart.lua's body, written out as its init() concatenates it."""
    lua = (f"--{BOUNDARY}\r\n"
           'Content-Disposition: form-data; name="images"; filename="upload.jpg"\r\n'
           "Content-Type: image/jpeg\r\n\r\n").encode() + IMAGE + f"\r\n--{BOUNDARY}--\r\n".encode()
    header, body = multipart_body(IMAGE)
    assert body == lua
    assert header == f"multipart/form-data; boundary={BOUNDARY}"


def test_no_images_is_not_a_request() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        multipart_body(IMAGE, 0)


def test_write_body_puts_the_body_beside_the_image(tmp_path) -> None:
    image = tmp_path / "photo.jpg"
    image.write_bytes(IMAGE)
    path, header = write_body(image, 3, "image/jpeg")
    assert path.parent == tmp_path and path.read_bytes() == multipart_body(IMAGE, 3)[1]
    assert header == multipart_body(IMAGE, 3)[0]


def test_wrk_times_are_read_in_milliseconds() -> None:
    assert load.wrk_ms("369.00us") == pytest.approx(0.369)
    assert load.wrk_ms("1.23ms") == pytest.approx(1.23)
    assert load.wrk_ms("2.01s") == pytest.approx(2010.0)
    with pytest.raises(ValueError):
        load.wrk_ms("fast")


def test_a_servers_memory_is_listed_per_process_its_own_first() -> None:
    parent = subprocess.Popen([sys.executable, "-c", CHILD_AND_WAIT], stdout=subprocess.PIPE,
                              text=True)
    child_pid = int(parent.stdout.readline())  # the child has started
    try:
        sizes = load.rss_by_process_mb(parent.pid)
        assert len(sizes) == 2 and all(size > 0 for size in sizes)
        assert sizes[0] == pytest.approx(psutil.Process(parent.pid).memory_info().rss / 2**20,
                                         rel=0.2)
        assert load.rss_mb(parent.pid) == pytest.approx(sum(sizes), rel=0.2)
    finally:
        for pid in (child_pid, parent.pid):  # ours, by PID
            os.kill(pid, signal.SIGKILL)
        parent.wait()


# A process with one child: prints the child's PID once it runs.
CHILD_AND_WAIT = ("import subprocess, time; child = subprocess.Popen(['sleep', '60']); "
                  "print(child.pid, flush=True); time.sleep(60)")
