"""bench/report.py's goal rows (issue 18) on hand-made results: each goal can pass and fail."""

from __future__ import annotations

from bench import report


def level(c: int, throughput: float, p50: float = 10.0, p99: float = 20.0, rss: float = 500.0,
          refused: int = 0) -> dict:
    return {"concurrency": c, "throughput": throughput, "p50_ms": p50, "p99_ms": p99,
            "server_rss_mb": rss, "status_429": 0, "status_503": refused, "status_504": 0}


def model(ours: list[dict], **peers: list[dict]) -> dict:
    served = {"bentoml": {"levels": ours, "idle_rss_mb": 300.0}}
    served.update({name: {"levels": levels, "idle_rss_mb": 320.0}
                   for name, levels in peers.items()})
    return {"kind": "light", "served": served, "upload": "jpeg-224"}


def verdicts(rows: list) -> dict[str, bool | None]:
    return {name: met for name, _, met in rows}


def test_the_best_peer_sets_the_bar_at_64_and_128_connections() -> None:
    entry = model([level(64, 390, p99=100), level(128, 300, p99=100)],
                  torchserve=[level(64, 300, p99=150), level(128, 290, p99=90)],
                  litserve=[level(64, 200, p99=50), level(128, 100, p99=50)])
    rows = verdicts(report.peer_rows("light", entry))
    assert rows["light: c=64 ≥ 1.3x the best peer (TorchServe, batching), p99 at or below its"]
    assert not rows["light: c=128 ≥ 1.3x the best peer (TorchServe, batching), p99 at or below "
                    "its"], "1.03x, and a longer p99"


def test_low_concurrency_latency_is_held_to_fastapis() -> None:
    entry = model([level(1, 100, p50=2.1, p99=5.0), level(4, 300, p50=9.0, p99=12.0)],
                  fastapi=[level(1, 100, p50=2.0), level(4, 300, p50=5.0)])
    rows = verdicts(report.peer_rows("digits", entry))
    assert rows["digits: c=1 p50 within 10% of FastAPI's (no batching)"]
    assert not rows["digits: c=4 p50 within 10% of FastAPI's (no batching)"]
    assert rows["digits: c=1 p99 within 3x its p50"]


def test_goodput_idle_and_peak_memory() -> None:
    entry = model([level(16, 100), level(128, 95, rss=650), level(256, 80, refused=40)])
    rows = verdicts(report.load_rows("heavy", entry, litserve_idle_mb=322.0))
    assert rows["heavy: goodput at c=128 ≥ 90% of the peak"]
    assert not rows["heavy: goodput at c=256 ≥ 90% of the peak"]
    assert rows["heavy: idle RSS (all processes) ≤ LitServe's"]
    assert not rows["heavy: peak RSS at c=128 ≤ 600 MB"]


def test_a_gpu_run_reports_the_cpu_servers_memory_and_start_targets_without_judging_them(
) -> None:
    entry = model([level(1, 200), level(128, 300, rss=2600.0), level(256, 300)])
    rows = verdicts(report.load_rows("resnet50", entry, None, on_gpu=True))
    assert rows["resnet50: peak RSS at c=128 (≤ 600 MB on a CPU)"] is None
    assert rows["resnet50: goodput at c=128 ≥ 90% of the peak"] is True
    assert verdicts(report.load_rows("resnet50", entry, None))[
        "resnet50: peak RSS at c=128 ≤ 600 MB"] is False


def test_the_report_names_the_options_of_its_run() -> None:
    args = {"models": "['resnet50']", "servers": "['bentoml']", "concurrency": "[1, 4]",
            "duration": "5", "ceiling_seconds": "1.0", "gpu": "True",
            "config": "/somewhere/configuration.gpu.yaml"}
    assert report.run_options(args) == (
        "--gpu --models resnet50 --servers bentoml --concurrency 1 4 --duration 5 "
        "--ceiling-seconds 1.0 --config configuration.gpu.yaml")


def test_profiles_are_tabled_by_run_and_older_results_still_read() -> None:
    runs = {"digits, c=64": {"ONNX Runtime (inference)": 0.2, "multipart parsing": 0.1},
            "digits, c=128": {"ONNX Runtime (inference)": 0.3}}
    assert report.profiles_of({"profile": runs}) == runs
    older = {"ONNX Runtime (inference)": 0.4}
    assert report.profiles_of({"profile": older}) == {"mobilenet_v3_small, c=64": older}
    assert report.profiles_of({}) == {}


def test_a_gpu_run_lists_what_each_change_of_batch_shape_cost() -> None:
    assert report.shape_change_lines({"decode_ms": {}}) == []
    lines = report.shape_change_lines({"shape_changes_ms": [[3, 631.2], [4, 158.0]]})
    assert lines[0].endswith("(size: ms): 3: 631, 4: 158.")
