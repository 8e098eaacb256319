"""bench/curves.py's pure logic: the points of each sweep, the limits a point needs, one
point's figures; and its section of docs/benchmarks.md (bench/report.py)."""

from __future__ import annotations

import argparse

import pytest

from bench import report
from bench.curves import (
    DEFAULTS,
    PER_REQUEST_UPLOAD,
    SCENE,
    Point,
    body_bytes,
    parse_args,
    raised_limits,
    refusals,
    summarize,
    sweep_points,
)
from bench.load import multipart_body

SIZES = ["jpeg-224", "jpeg-640x480", "jpeg-12mp", "png-screenshot"]
SHIPPED = {"max_images_per_request": 32, "max_image_pixels": 40_000_000,
           "max_request_bytes": 32 * 2**20}


def args(**given: object) -> argparse.Namespace:
    return argparse.Namespace(**{"concurrency": 16, "images_per_request": [1, 8, 32],
                                 "connections": [1, 2, 512], **given})


def test_the_defaults_sweep_connections_from_1_to_512() -> None:
    assert DEFAULTS.connections == (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
    assert DEFAULTS.images_per_request == (1, 8, 32)


def test_quick_shortens_what_was_left_at_its_default() -> None:
    quick = parse_args(["--quick", "--connections", "1", "4"])
    assert quick.duration < DEFAULTS.duration and quick.connections == [1, 4], quick
    assert str(quick.out).endswith("build/bench/quick"), "a smoke run keeps out of docs/"


def test_a_classifier_gets_every_sweep_at_the_fixed_concurrency() -> None:
    sizes = sweep_points("image_size", "classification", args(), SIZES)
    assert sizes == [Point("image_size", key, 1, 16) for key in SIZES]
    per_request = sweep_points("images_per_request", "classification", args(), SIZES)
    assert [(p.upload, p.images_per_request, p.concurrency) for p in per_request] == [
        (PER_REQUEST_UPLOAD, 1, 16), (PER_REQUEST_UPLOAD, 8, 16), (PER_REQUEST_UPLOAD, 32, 16)]
    connections = sweep_points("connections", "classification", args(), SIZES)
    assert [(p.upload, p.images_per_request, p.concurrency) for p in connections] == [
        ("jpeg-224", 1, 1), ("jpeg-224", 1, 2), ("jpeg-224", 1, 512)]


def test_the_detector_sends_its_scene_and_has_no_image_size_sweep() -> None:
    assert sweep_points("image_size", "detection", args(), SIZES) == []
    points = [*sweep_points("images_per_request", "detection", args(), SIZES),
              *sweep_points("connections", "detection", args(), SIZES)]
    assert points and {p.upload for p in points} == {SCENE}


def test_an_unknown_sweep_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown sweep"):
        sweep_points("colour", "classification", args(), SIZES)


@pytest.mark.parametrize("count", [1, 8, 32])
@pytest.mark.parametrize("content_type", ["image/jpeg", "image/png"])
def test_body_bytes_is_the_length_of_the_body_built(count: int, content_type: str) -> None:
    data = bytes(range(256)) * 7
    expected = len(multipart_body(data, count, content_type=content_type)[1])
    assert body_bytes(len(data), count, content_type) == expected


def test_the_shipped_limits_admit_32_images_and_a_12_megapixel_photo() -> None:
    assert refusals(SHIPPED, 4000, 3000, 32, 3 * 2**20) == []


def test_each_limit_a_request_passes_is_named_with_what_it_needed() -> None:
    limits = {"max_images_per_request": 8, "max_image_pixels": 1_000_000,
              "max_request_bytes": 1000}
    assert refusals(limits, 4000, 3000, 32, 5000) == [
        "max_images_per_request 8 < 32", "max_image_pixels 1000000 < 12000000",
        "max_request_bytes 1000 < 5000"]
    assert refusals(limits, 1000, 1000, 8, 1000) == [], "at the limit is admitted"


def test_raised_limits_admit_every_refused_point_and_nothing_else() -> None:
    limits = {"max_images_per_request": 8, "max_image_pixels": 1_000_000,
              "max_request_bytes": 10**6}
    needs = [{"max_images_per_request": 32, "max_image_pixels": 307_200,
              "max_request_bytes": 2 * 10**6},
             {"max_images_per_request": 16, "max_image_pixels": 12_000_000,
              "max_request_bytes": 10**5}]
    change = raised_limits(limits, 64, needs)
    assert change == {"limits": {"max_images_per_request": 32, "max_image_pixels": 12_000_000,
                                 "max_request_bytes": 2 * 10**6}}
    assert raised_limits(limits, 64, []) == {}


def test_raising_images_per_request_past_a_batch_raises_the_batch() -> None:
    change = raised_limits(SHIPPED, 64, [{"max_images_per_request": 128}])
    assert change == {"limits": {"max_images_per_request": 128},
                      "batching": {"max_batch_size": 128}}, "one request must fit one batch"


def load_result(**given: object) -> dict:
    """A bench.load.LoadResult as asdict() gives it."""
    return {"concurrency": 16, "seconds": 10.0, "requests": 1200, "ok": 1000,
            "throughput": 100.0, "p50_ms": 50.0, "p95_ms": 90.0, "p99_ms": 120.0,
            "status_429": 150, "status_503": 40, "status_504": 0, "other_errors": 10,
            "server_cpu_cores": 1.6, "server_rss_mb": 500.0, "server_rss_start_mb": 480.0,
            "server_rss_end_mb": 500.0, "loadgen_cpu_cores": 0.05, "batch_sizes": {},
            "status_413": 0, "status_other": 10, "socket_errors": 0,
            "images_per_request": 8, "body_bytes": 400_000, **given}


def test_a_point_counts_goodput_images_and_refusals_apart() -> None:
    figures = summarize(load_result())
    assert figures["answers_per_s"] == pytest.approx(120.0), "every answer, whatever its status"
    assert figures["goodput_per_s"] == pytest.approx(100.0), "200 answers only"
    assert figures["images_per_s"] == pytest.approx(800.0), "goodput x images per request"
    assert figures["refused_per_s"] == pytest.approx(19.0), "429 and 503"
    assert figures["cpu_ms_per_image"] == pytest.approx(2.0), "1.6 cores / 800 images/s"
    assert figures["p99_ms"] == 120.0, "the load result's own figures are kept"


def test_a_point_with_no_200_has_no_cost_per_image() -> None:
    figures = summarize(load_result(ok=0, status_413=1200))
    assert figures["images_per_s"] == 0 and figures["cpu_ms_per_image"] is None


# --- the report section -----------------------------------------------------------------------

def curves(refused: bool = False) -> dict:
    point = {**summarize(load_result(status_429=0, status_503=0, status_other=0)),
             "upload": "jpeg-640x480", "refused_by_limits": [], "limits_raised": False}
    shipped = {"max_images_per_request": 32, "max_image_pixels": 40_000_000,
               "max_request_bytes": 33_554_432}
    sweep = {"concurrency": 16, "ready_s": 3.0, "overrides": {},
             "points": [{**point, "images_per_request": 1}, {**point, "images_per_request": 8}]}
    if refused:
        over = {**point, "images_per_request": 64, "ok": 0, "status_413": 1200,
                "refused_by_limits": ["max_images_per_request 32 < 64"]}
        sweep["points"] += [over, {**point, "images_per_request": 64, "limits_raised": True}]
    return {"machine": {"cpu": "CPU", "cores": 2, "memory_gib": 8, "os": "Linux",
                        "python": "3.11"},
            "started": "2026-01-01 00:00:00", "quick": False, "duration_s": 10, "warmup_s": 2,
            "concurrency": 16, "config": "/repo/configuration.yaml",
            "service": {"classification": {"workers": 2, "intra_op_threads": 1,
                                           "max_batch_size": 64, "max_latency_ms": 1000,
                                           "limits": shipped, "max_concurrency": 128}},
            "uploads": {"jpeg-640x480": {"label": "640x480 JPEG", "file": "photo.jpg",
                                         "content_type": "image/jpeg", "width": 640,
                                         "height": 480, "bytes": 47_921}},
            "models": {"digits": {"tag": "digits:x", "kind": "default",
                                  "task": "classification",
                                  "sweeps": {"images_per_request": sweep}}}}


def test_the_section_has_a_row_per_point_and_says_the_limits_admit_them() -> None:
    lines = report.curves_section(curves(), ["curves-images-per-request.png"])
    assert lines[0] == report.CURVES_HEADING
    rows = [line for line in lines if line.startswith("| digits |")]
    assert [row.split(" | ")[1] for row in rows] == ["1", "8"], rows
    assert "| digits | 8 | 120.0 | 100.0 | 800.0 |" in rows[1], "answers, goodput, images/s"
    assert any("admit every point" in line for line in lines)
    assert "![curves-images-per-request.png](bench/curves-images-per-request.png)" in lines


def test_a_refusal_by_the_shipped_limits_is_reported_and_the_raised_rerun_marked() -> None:
    lines = report.curves_section(curves(refused=True), [])
    text = "\n".join(lines)
    assert "The shipped limits refuse" in text and "max_images_per_request 32 < 64" in text
    assert "| digits | 64 (limits raised) |" in text
    assert "admit every point" not in text
    assert "from 1 to 64 images per request (limits raised), 800 -> 800 images/s" in text, \
        "the findings read the run that answered, and say its limits were raised"


def test_a_config_other_than_the_shipped_one_is_named_as_configured() -> None:
    given = {**curves(refused=True), "config": "/tmp/low-limits.yaml"}
    text = "\n".join(report.curves_section(given, []))
    assert "(low-limits.yaml)" in text and "The configured limits refuse" in text


def test_as_answered_puts_the_raised_run_in_place_of_the_refused_one() -> None:
    def point(n: int, raised: bool) -> dict:
        return {"upload": "u", "images_per_request": n, "concurrency": 16,
                "limits_raised": raised}

    points = [point(1, False), point(64, False), point(128, False), point(64, True)]
    assert report.as_answered(points) == [point(1, False), point(64, True), point(128, False)]


def test_the_section_replaces_its_old_self_and_keeps_the_rest() -> None:
    old = "# B\n\n## digits\n\nrow\n\n## How cost grows\n\nold\n\n## Analysis\n\nwhy\n"
    new = report.replace_section(old, report.CURVES_HEADING, [report.CURVES_HEADING, "", "new"])
    assert new == "# B\n\n## digits\n\nrow\n\n## How cost grows\n\nnew\n\n## Analysis\n\nwhy\n"


def test_the_section_goes_before_the_analysis_or_at_the_end() -> None:
    section = [report.CURVES_HEADING, "", "new", ""]
    placed = report.replace_section("# B\n\n## Analysis\n\nwhy\n", report.CURVES_HEADING,
                                    section)
    assert placed == "# B\n\n## How cost grows\n\nnew\n\n## Analysis\n\nwhy\n"
    assert report.replace_section("# B\n", report.CURVES_HEADING, section) == \
        "# B\n\n## How cost grows\n\nnew\n"


def test_subheadings_stay_inside_the_section() -> None:
    old = "# B\n\n## How cost grows\n\n### Image size\n\nold\n\n## Levers\n\nkept\n"
    new = report.replace_section(old, report.CURVES_HEADING, [report.CURVES_HEADING, "", "x"])
    assert new == "# B\n\n## How cost grows\n\nx\n\n## Levers\n\nkept\n"

