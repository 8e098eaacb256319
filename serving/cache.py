"""Upload -> an answer already given: the result cache (`cache.enabled`, off by default).

Per worker process, in memory, least recently used first out, bounded in entries and in bytes.
An answer is found by what decides it:
- the upload's bytes (their BLAKE2b-256 digest; the name and declared type play no part);
- the exact tag of the model that answers (the routed variant's, never `latest`): a new model, by
  rollout or by a restart on a new tag, never serves an old model's answer;
- the request's options (a detector's thresholds, the configured defaults filled in);
- the service's settings that shape an answer (the classifier's `response.top_k`).

serving/inputs.py looks an upload up before decoding it; a hit becomes an Item that carries the
answer, which serving/predictor.py returns without running it (and marks `cached: true`, with
its own short processing_ms); a miss carries a CacheSlot, where the predictor stores the answer.
Only /classify and /detect uploads are cached: tensors are already decoded (their bytes are the
work), and a job's files are read after its submit has answered.

Answers are held as their JSON, so that max_bytes counts what is held; a hit is parsed again
(tens of microseconds). /metrics counts hits and misses per model: hit ratio = hits / (hits +
misses).
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass
from typing import BinaryIO

from pydantic import BaseModel

from . import metrics

# What an entry holds besides its answer's JSON: the key and its digest, the entry's objects
# and its place in the LRU order. About 320 bytes measured with tracemalloc; rounded up, so that
# max_bytes bounds the memory (tests/serving/test_cache.py checks it against tracemalloc).
ENTRY_OVERHEAD_BYTES = 512
DIGEST_BYTES = 32
CHUNK_BYTES = 1024 * 1024  # an upload over this (up to limits.max_request_bytes) is read in parts


def upload_digest(file: BinaryIO) -> bytes:
    """The BLAKE2b-256 digest of an upload's bytes, read in chunks; the file is left at its
    start for the decoder."""
    digest = hashlib.blake2b(digest_size=DIGEST_BYTES)
    file.seek(0)
    while chunk := file.read(CHUNK_BYTES):
        digest.update(chunk)
    file.seek(0)
    return digest.digest()


@dataclass(frozen=True, slots=True)
class CacheKey:
    digest: bytes  # of the upload's bytes
    model: str  # the exact tag of the model that answers
    options: Hashable  # the request's options (a detector's Thresholds), or None
    answer_settings: str  # the service's settings that shape answers (the classifier's top_k)


@dataclass(frozen=True, slots=True)
class CachedAnswer:
    """An answer as it was first given, and the upload's size for /metrics on a hit."""

    json: bytes
    kind: type[BaseModel]  # Prediction, DetectionResult
    pixels: int  # width x height of the upload

    def answer(self, processing_ms: float) -> BaseModel:
        """The answer again, marked cached, with this request's own processing time."""
        answer = self.kind.model_validate_json(self.json)
        return answer.model_copy(update={"cached": True,
                                         "processing_ms": round(processing_ms, 3)})

    @property
    def size(self) -> int:
        return len(self.json) + ENTRY_OVERHEAD_BYTES


class ResultCache:
    """Answers by CacheKey, least recently used first out once over `max_entries` or
    `max_bytes`. Thread-safe: uploads are looked up in the event loop, answers stored from the
    batch's thread."""

    def __init__(self, max_entries: int, max_bytes: int) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.bytes = 0
        self._entries: OrderedDict[CacheKey, CachedAnswer] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, key: CacheKey) -> CachedAnswer | None:
        """The answer for `key`, or None; counted in /metrics as a hit or a miss."""
        with self._lock:
            found = self._entries.get(key)
            if found is not None:
                self._entries.move_to_end(key)
        (metrics.cache_hits() if found is not None else metrics.cache_misses()
         ).labels(key.model).inc()
        return found

    def store(self, key: CacheKey, answer: BaseModel, pixels: int) -> None:
        """Keep `answer` under `key`; evicts the least recently used entries to fit. An answer
        larger than max_bytes on its own is not kept."""
        entry = CachedAnswer(answer.model_dump_json().encode(), type(answer), pixels)
        if entry.size > self.max_bytes:
            return
        evicted = 0
        with self._lock:
            previous = self._entries.pop(key, None)
            if previous is not None:  # two requests for one image in flight: the last wins
                self.bytes -= previous.size
            self._entries[key] = entry
            self.bytes += entry.size
            while len(self._entries) > self.max_entries or self.bytes > self.max_bytes:
                _, dropped = self._entries.popitem(last=False)
                self.bytes -= dropped.size
                evicted += 1
        if evicted:
            metrics.cache_evictions().labels(key.model).inc(evicted)


@dataclass(frozen=True, slots=True)
class CacheSlot:
    """Where a missed upload's answer goes once the predictor has it."""

    cache: ResultCache
    key: CacheKey
    pixels: int

    def store(self, answer: BaseModel) -> None:
        self.cache.store(self.key, answer, self.pixels)
