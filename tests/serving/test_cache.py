"""Result cache: keys, least-recently-used eviction by entries and by bytes, the bytes it counts
against what Python really allocates, hits and misses in /metrics; an upload looked up before it
is decoded (serving/inputs.py); and the predictor answering cached rows without running them
(serving/predictor.py): no drift, no shadow, counted in the answers' metrics."""

from __future__ import annotations

import io
import time
import tracemalloc
from types import SimpleNamespace
from typing import Any

import numpy as np
import prometheus_client
import pytest
from starlette.datastructures import Headers, UploadFile

from serving.cache import (
    CHUNK_BYTES,
    ENTRY_OVERHEAD_BYTES,
    CacheKey,
    CacheSlot,
    ResultCache,
    upload_digest,
)
from serving.classification import Classification
from serving.inputs import Inputs
from serving.predictor import NO_PIXELS, Item, Predictor
from serving.routing import Router
from serving.schemas import ClassScore, DetectedObject, DetectionResult, Prediction
from serving.settings import ClassifierSettings
from tests.serving.test_predictor import (
    GRAPH,
    LABELS,
    SPEC,
    FakeRuntime,
    RecordingMonitor,
    png,
)


def prediction(label: str = "7", model: str = "m:1", processing_ms: float = 12.5) -> Prediction:
    scores = [ClassScore(label=label, class_id=7, probability=0.9),
              ClassScore(label="1", class_id=1, probability=0.05)]
    return Prediction(label=label, class_id=7, confidence=0.9, top_k=scores, model=model,
                      processing_ms=processing_ms)


def key(n: int = 0, model: str = "m:1", options: Any = None, settings: str = "{}") -> CacheKey:
    return CacheKey(n.to_bytes(32, "big"), model, options, settings)


def sample(name: str, model: str) -> float:
    return prometheus_client.REGISTRY.get_sample_value(name, {"model": model}) or 0.0


def test_a_hit_is_the_same_answer_marked_cached_with_its_own_time() -> None:
    cache = ResultCache(max_entries=10, max_bytes=1 << 20)
    first = prediction(processing_ms=12.5)
    cache.store(key(), first, pixels=64)
    hit = cache.lookup(key())
    assert hit is not None and hit.pixels == 64
    again = hit.answer(0.0421)
    assert again.cached is True and again.processing_ms == 0.042, \
        "a hit says so, with its own processing time"
    assert again.model_dump(exclude={"cached", "processing_ms"}) == \
        first.model_dump(exclude={"cached", "processing_ms"})
    detection = DetectionResult(detections=[DetectedObject(label="3", class_id=3, score=0.8,
                                                           box=[1.0, 2.0, 3.0, 4.0])],
                                width=10, height=8, model="d:1", processing_ms=3.0)
    cache.store(key(1, "d:1"), detection, pixels=80)
    found = cache.lookup(key(1, "d:1"))
    assert found is not None
    assert found.answer(1.0) == detection.model_copy(update={"cached": True,
                                                             "processing_ms": 1.0})


def test_every_part_of_the_key_tells_answers_apart() -> None:
    cache = ResultCache(max_entries=10, max_bytes=1 << 20)
    cache.store(key(1, "m:1", ("conf", 0.5), '{"response":{"top_k":3}}'), prediction(), 1)
    assert cache.lookup(key(1, "m:1", ("conf", 0.5), '{"response":{"top_k":3}}')) is not None
    for other in (key(2, "m:1", ("conf", 0.5), '{"response":{"top_k":3}}'),  # other bytes
                  key(1, "m:2", ("conf", 0.5), '{"response":{"top_k":3}}'),  # another model
                  key(1, "m:1", ("conf", 0.4), '{"response":{"top_k":3}}'),  # other options
                  key(1, "m:1", ("conf", 0.5), '{"response":{"top_k":5}}')):  # another top_k
        assert cache.lookup(other) is None, f"{other} must not find the answer of another key"


def test_the_least_recently_used_answer_goes_first_past_max_entries() -> None:
    cache = ResultCache(max_entries=3, max_bytes=1 << 20)
    for n in range(3):
        cache.store(key(n), prediction(), 1)
    assert cache.lookup(key(0)) is not None  # 0 is now the most recently used
    cache.store(key(3), prediction(), 1)
    assert len(cache) == 3
    assert cache.lookup(key(1)) is None, "1 was the least recently used"
    assert all(cache.lookup(key(n)) is not None for n in (0, 2, 3))


def test_max_bytes_bounds_what_is_held() -> None:
    one = len(prediction().model_dump_json()) + ENTRY_OVERHEAD_BYTES
    cache = ResultCache(max_entries=1000, max_bytes=3 * one + one // 2)
    for n in range(10):
        cache.store(key(n), prediction(), 1)
        assert cache.bytes <= cache.max_bytes
    assert len(cache) == 3 and cache.bytes == 3 * one
    assert [cache.lookup(key(n)) is not None for n in range(10)] == [False] * 7 + [True] * 3
    cache.store(key(9), prediction(), 1)  # the same key again: replaced, not counted twice
    assert cache.bytes == 3 * one
    tiny = ResultCache(max_entries=10, max_bytes=one - 1)
    tiny.store(key(), prediction(), 1)
    assert len(tiny) == 0 and tiny.bytes == 0, "an answer larger than max_bytes is not kept"


def test_the_bytes_counted_cover_what_python_allocates() -> None:
    """max_bytes is a memory budget: the accounting (JSON + ENTRY_OVERHEAD_BYTES per entry)
    must not undercount what the entries really take, nor overcount it wildly."""
    entries = 2000
    answers = [prediction(label=str(n % 10), model="digits-classifier:abcdefghijklmnop")
               for n in range(entries)]  # built before tracing: a real answer exists anyway
    tag = "digits-classifier:abcdefghijklmnop"  # one string, shared by every key
    cache = ResultCache(max_entries=entries, max_bytes=1 << 30)
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for n, answer in enumerate(answers):  # the key and its digest are held by the cache too
        cache.store(CacheKey(n.to_bytes(32, "big"), tag, None, "{}"), answer, 784)
    allocated = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    assert allocated <= cache.bytes, f"{allocated} bytes allocated, {cache.bytes} counted"
    assert allocated >= 0.5 * cache.bytes, f"{allocated} bytes allocated, {cache.bytes} counted"


def test_hits_and_misses_are_counted_per_model() -> None:
    model = "counted:v1"
    hits, misses = sample("image_classifier_cache_hits_total", model), \
        sample("image_classifier_cache_misses_total", model)
    cache = ResultCache(max_entries=10, max_bytes=1 << 20)
    cache.lookup(key(model=model))
    cache.store(key(model=model), prediction(model=model), 1)
    cache.lookup(key(model=model))
    cache.lookup(key(model=model))
    assert sample("image_classifier_cache_hits_total", model) - hits == 2
    assert sample("image_classifier_cache_misses_total", model) - misses == 1


def test_evictions_are_counted() -> None:
    model = "evicted:v1"
    before = sample("image_classifier_cache_evictions_total", model)
    cache = ResultCache(max_entries=2, max_bytes=1 << 20)
    for n in range(5):
        cache.store(key(n, model), prediction(model=model), 1)
    assert sample("image_classifier_cache_evictions_total", model) - before == 3


def test_the_digest_is_of_the_bytes_and_leaves_the_file_at_its_start() -> None:
    data = bytes(range(256)) * (CHUNK_BYTES // 256 + 3)  # more than one chunk
    file = io.BytesIO(data)
    file.seek(100)
    digest = upload_digest(file)
    assert file.tell() == 0, "the decoder reads the file next, from its start"
    assert digest == upload_digest(io.BytesIO(data)) and len(digest) == 32
    assert digest != upload_digest(io.BytesIO(data[:-1] + b"\x00"))


# --- the predictor: cached rows answered without running them --------------------------------

class RecordingShadow:
    def __init__(self) -> None:
        self.offered: list[np.ndarray] = []

    def offer(self, pixels: np.ndarray, served: Any, models: Any, contexts: Any) -> None:
        self.offered.append(pixels)


def image(value: int, variant: int = 0, slot: CacheSlot | None = None) -> Item:
    return Item(np.full(SPEC.shape, value, np.uint8), time.perf_counter(), variant,
                cache_slot=slot)


def cached(cache: ResultCache, k: CacheKey, variant: int = 0) -> Item:
    hit = cache.lookup(k)
    assert hit is not None
    return Item(NO_PIXELS, time.perf_counter(), variant, cached=hit)


def test_cached_rows_are_answered_in_place_and_never_run() -> None:
    cache = ResultCache(max_entries=10, max_bytes=1 << 20)
    cache.store(key(1, "m:v0"), prediction(label="c", model="m:v0"), 16)
    runtime, monitor, shadow = FakeRuntime(winner=1), RecordingMonitor(), RecordingShadow()
    served = Predictor(Classification(LABELS, top_k=2), GRAPH, [runtime], ["m:v0"], [monitor],
                       shadow)  # type: ignore[arg-type]
    slot = CacheSlot(cache, key(2, "m:v0"), 16)
    batch = [image(10), cached(cache, key(1, "m:v0")), image(30, slot=slot)]
    answers = served.predict(batch)
    assert [a.label for a in answers] == ["b", "c", "b"], "each answer in its row's place"
    assert [a.cached for a in answers] == [False, True, False]
    assert runtime.batches == [2], "only the two rows without an answer are run"
    assert np.concatenate(monitor.seen)[:, 0].tolist() == [10.0, 30.0], \
        "the drift window sees real inferences only"
    assert [p[:, 0, 0, 0].tolist() for p in shadow.offered] == [[10, 30]], \
        "the shadow is offered real inferences only"
    stored = cache.lookup(key(2, "m:v0"))
    assert stored is not None and stored.answer(0.0).label == "b", \
        "a new answer is kept where its slot says"


def test_a_batch_of_cached_rows_runs_nothing_and_is_counted_by_class() -> None:
    cache = ResultCache(max_entries=10, max_bytes=1 << 20)
    model = "all-cached:v0"
    cache.store(key(1, model), prediction(label="a", model=model), 16)
    runtime = FakeRuntime(winner=2)
    served = Predictor(Classification(LABELS, top_k=2), GRAPH, [runtime], [model])
    before = prometheus_client.REGISTRY.get_sample_value(
        "image_classifier_predictions_total", {"model": model, "label": "a"}) or 0.0
    answers = served.predict([cached(cache, key(1, model)), cached(cache, key(1, model))])
    assert [(a.label, a.cached) for a in answers] == [("a", True), ("a", True)]
    assert runtime.batches == [], "nothing to run"
    after = prometheus_client.REGISTRY.get_sample_value(
        "image_classifier_predictions_total", {"model": model, "label": "a"})
    assert after == before + 2, "answers by class count the cached answers too"


# --- the upload validator: routed, then looked up before decoding ------------------------------

def upload(data: bytes) -> UploadFile:
    return UploadFile(io.BytesIO(data), size=len(data), filename="a.png",
                      headers=Headers({"content-type": "image/png"}))


def inputs(settings: dict[str, Any], tags: tuple[str, ...] = ("m:v1",)) -> Inputs:
    """Inputs over a deployment that has only what the validators read."""
    deployment = SimpleNamespace(
        card=SimpleNamespace(input=SPEC), settings=ClassifierSettings.model_validate(settings),
        served=[SimpleNamespace(tag=t) for t in tags], router=Router([1] * len(tags), []))
    top_k = deployment.settings.response.top_k
    return Inputs(deployment, Classification(LABELS, top_k))  # type: ignore[arg-type]


def decode(served: Inputs, data: bytes) -> Item:
    item: Item = served._decode_upload(upload(data), lambda value: value)
    return item


def test_an_upload_is_decoded_once_and_then_answered_from_the_cache() -> None:
    served = inputs({"cache": {"enabled": True}})
    first = decode(served, png(7))
    assert first.cached is None and first.array.shape == SPEC.shape
    assert first.cache_slot is not None and first.cache_slot.key.model == "m:v1"
    assert first.cache_slot.pixels == 60, "the upload's size, for image_pixels on a hit"
    first.cache_slot.store(prediction(model="m:v1"))
    again = decode(served, png(7))
    assert again.cached is not None and again.array is NO_PIXELS, "a hit is not decoded"
    assert decode(served, png(8)).cached is None, "other bytes: a miss"


def test_without_the_cache_nothing_is_hashed_or_kept() -> None:
    served = inputs({})
    assert served.cache is None
    item = decode(served, png(7))
    assert item.cached is None and item.cache_slot is None


def test_the_classifiers_top_k_is_part_of_the_key() -> None:
    three = inputs({"cache": {"enabled": True}, "response": {"top_k": 3}})
    five = inputs({"cache": {"enabled": True}, "response": {"top_k": 5}})
    slot3, slot5 = decode(three, png(7)).cache_slot, decode(five, png(7)).cache_slot
    assert slot3 is not None and slot5 is not None
    assert slot3.key.digest == slot5.key.digest and slot3.key != slot5.key
    assert "top_k" in slot3.key.answer_settings


@pytest.mark.parametrize("tags", [("m:v1", "m:v2")])
def test_the_key_holds_the_routed_variants_exact_tag(tags: tuple[str, ...]) -> None:
    served = inputs({"cache": {"enabled": True}}, tags)
    seen = set()
    for _ in range(64):  # no request: routed at random by weight, 50/50
        slot = decode(served, png(7)).cache_slot
        assert slot is not None
        seen.add(slot.key.model)
    assert seen == set(tags), "each variant's answers are kept under its own tag"
