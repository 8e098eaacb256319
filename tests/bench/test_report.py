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
    partial = {**args, "gpu": "False", "levers": "True", "curves": "False"}
    assert report.run_options(partial).endswith("--config configuration.gpu.yaml --no-curves")


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


def cpu_level(c: int, throughput: float, cores: float, p50: float = 10.0, p99: float = 20.0
              ) -> dict:
    return {**level(c, throughput, p50=p50, p99=p99), "server_cpu_cores": cores}


def classifier(ours: list[dict], ceiling: float, decode_ms: float, **peers: list[dict]) -> dict:
    """A classifier's entry: the runtime's best `ceiling` images/s on 2 cores at batch 8,
    batch 1 at half that; one upload decodes in `decode_ms`."""
    entry = model(ours, **peers)
    rates = {"1": ceiling / 2, "8": ceiling}
    entry.update(runtime_service_threads=rates, runtime_all_threads=rates,
                 decode_ms={"jpeg-224": decode_ms})
    return entry


def results_of(key: str, entry: dict, levers: list | None = None, profile: dict | None = None
               ) -> dict:
    return {"args": {"gpu": "False"}, "machine": {"cores": 2},
            "service": {"workers": 2, "intra_op_threads": 1}, "models": {key: entry},
            "levers": levers or [], "profile": profile or {}}


def test_a_peer_goal_past_what_any_server_can_answer_is_bound_by_the_runtime() -> None:
    # 2 cores / (37.7 + 0.3 core-ms per image) = 52.6/s at most; 1.3x the peer's 51 is 66.
    entry = classifier([cpu_level(64, 49, 1.98)], ceiling=53.0, decode_ms=0.3,
                       torchserve=[cpu_level(64, 51, 1.9)])
    bound = report.peer_bound("resnet18", entry, 64, results_of("resnet18", entry))
    assert "No server can answer that on these 2 cores" in bound
    assert "at most 53/s" in bound and "TorchServe, batching answers 97%" in bound


def test_a_peer_goal_within_reach_gets_its_cpu_budget_per_answer() -> None:
    entry = classifier([cpu_level(64, 1344, 1.91)], ceiling=6875.0, decode_ms=0.06,
                       torchserve=[cpu_level(64, 1845, 1.9)])
    entry["served"]["bentoml"]["floor"] = {
        "middleware route": {"throughput": 2468, "p50_ms": 0.25, "server_core_ms": 0.20}}
    profile = {"digits, c=64": {"ONNX Runtime (inference)": 0.18, "multipart parsing": 0.09}}
    bound = report.peer_bound("digits", entry, 64, results_of("digits", entry, profile=profile))
    # 1.91 cores x 1000 / 1344 = 1.42 core-ms spent; / (1.3 x 1845) = 0.80 allowed.
    assert "1.42 core-ms per answer, where 1.3x allows 0.80" in bound
    assert "take 0.35 of the 0.80" in bound  # 2000 / 6875 + 0.06
    assert "0.25 core-ms would be left" in bound  # 0.80 - 0.35 - 0.20
    assert "ONNX Runtime (inference) 18%" in bound and "Java front end" in bound


def test_met_peer_goals_need_no_bound_and_a_longer_tail_alone_is_named() -> None:
    entry = classifier([cpu_level(64, 600, 1.9, p99=100), cpu_level(128, 600, 1.9, p99=400)],
                       ceiling=900.0, decode_ms=0.2,
                       torchserve=[cpu_level(64, 400, 1.9, p99=300),
                                   cpu_level(128, 400, 1.9, p99=300)])
    results = results_of("light", entry)
    assert report.peer_bound("light", entry, 64, results) is None
    assert "the tail's is not" in report.peer_bound("light", entry, 128, results)


def test_a_lone_request_slower_than_fastapis_is_explained_by_what_the_run_measured() -> None:
    # A heavy runtime on one thread per worker: 2 workers x 1000 / 26.5 = 75 ms per image.
    heavy = classifier([cpu_level(1, 13, 1.0, p50=76.0)], ceiling=53.0, decode_ms=0.3,
                       fastapi=[cpu_level(1, 47, 2.0, p50=21.0)])
    levers = [{"model": "heavy", "concurrency": 1, "name": "2 workers x 2 ORT threads",
               "throughput": 46.8}, {"model": "heavy", "concurrency": 1,
                                     "name": "shipped defaults", "throughput": 27.3}]
    bound = report.latency_bound("heavy", heavy, 1, results_of("heavy", heavy, levers))
    assert "already over" in bound and "`model.intra_op_threads: 2`" in bound
    assert "46.8/s against 27.3 shipped at c=1" in bound
    # A light runtime: the difference is the service's own path.
    light = classifier([cpu_level(1, 700, 1.0, p50=1.4), cpu_level(4, 900, 0.9, p50=5.0)],
                       ceiling=6800.0, decode_ms=0.06,
                       fastapi=[cpu_level(1, 970, 1.0, p50=1.0),
                                cpu_level(4, 1000, 1.0, p50=3.8)])
    results = results_of("light", light)
    assert "not a bound of the machine" in report.latency_bound("light", light, 1, results)
    # Four connections that kept one of two cores busy: they landed on one worker.
    pinned = report.latency_bound("light", light, 4, results)
    assert "landed unevenly" in pinned and "What would lift it: `connections.balance`" in pinned
    results["service"]["connections_balance"] = True
    pinned = report.latency_bound("light", light, 4, results)
    assert "was on and did not move them" in pinned and "What would lift it" not in pinned
    fast = classifier([cpu_level(1, 900, 1.0, p50=1.05)], ceiling=6800.0, decode_ms=0.06,
                      fastapi=[cpu_level(1, 970, 1.0, p50=1.0)])
    assert report.latency_bound("fast", fast, 1, results_of("fast", fast)) is None


def test_a_heavy_models_request_alone_is_held_to_the_runtime_on_every_core() -> None:
    """Where the run's service opened the session on every core for calls alone
    (lone_request_threads, serving/cores.py), the image's time is the runtime's on every core."""
    heavy = classifier([cpu_level(1, 40, 1.9, p50=25.0)], ceiling=53.0, decode_ms=0.3,
                       fastapi=[cpu_level(1, 47, 2.0, p50=21.0)])
    heavy["runtime_all_threads"] = {"1": 55.0, "8": 58.0}  # 18.2 ms for one image
    results = results_of("heavy", heavy)
    assert "already over" in report.latency_bound("heavy", heavy, 1, results), \
        "not recorded: one thread per worker (75 ms)"
    results["service"]["lone_request_threads"] = "auto"
    bound = report.latency_bound("heavy", heavy, 1, results)
    assert "(on every core, a request alone) and its decoding take 18.48 ms" in bound
    assert "not a bound of the machine" in bound and "already over" not in bound
    heavy["runtime_all_threads"] = {"1": 40.0, "8": 58.0}  # 25 ms: over FastAPI's whole request
    bound = report.latency_bound("heavy", heavy, 1, results)
    assert "runs on every core here" in bound and "intra_op_threads" not in bound
    results["service"]["lone_request_threads"] = 1  # off
    assert "`model.intra_op_threads: 2`" in report.latency_bound("heavy", heavy, 1, results)


def test_what_the_server_opened_decides_over_the_setting_where_the_run_recorded_it() -> None:
    """/model_info's device.lone_request_threads, kept in the served entry since round 11: a
    light model's request alone on every core (auto opens it for every model now), and on one
    thread where the server opened none."""
    light = classifier([cpu_level(1, 300, 1.0, p50=3.0)], ceiling=500.0, decode_ms=0.2,
                       fastapi=[cpu_level(1, 450, 2.0, p50=2.0)])
    light["runtime_all_threads"] = {"1": 800.0, "8": 900.0}  # 1.25 ms for one image
    results = results_of("light", light)
    results["service"]["lone_request_threads"] = "auto"
    assert "(on every core" not in report.latency_bound("light", light, 1, results), \
        "not recorded: auto was for images of 10 ms or more (8 ms here)"
    light["served"]["bentoml"]["lone_request_threads"] = 2
    assert "(on every core, a request alone) and its decoding take 1.45 ms" in \
        report.latency_bound("light", light, 1, results)
    light["served"]["bentoml"]["lone_request_threads"] = 0
    assert "(on every core" not in report.latency_bound("light", light, 1, results)


def test_a_gpu_run_gets_no_bounds_of_cpu_goals() -> None:
    entry = classifier([cpu_level(64, 10, 1.0)], ceiling=53.0, decode_ms=0.3,
                       torchserve=[cpu_level(64, 51, 1.9)])
    results = results_of("resnet50", entry)
    assert report.miss_bounds(results)
    results["args"]["gpu"] = "True"
    assert report.miss_bounds(results) == []


def test_idle_memory_says_where_it_sits() -> None:
    assert report.processes_note([101.2, 139.6, 140.4]) == (
        " (main process 101 MB, 2 processes 140 MB)")
    assert report.processes_note([100.0, 120.0, 140.0]) == (
        " (main process 100 MB, 2 processes 120-140 MB)")
    assert report.processes_note([300.0]) == ""
