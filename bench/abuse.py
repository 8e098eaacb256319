"""Abusive traffic beside a valid load (`make soak`): the requests the hardening tests send, at a
modest fixed rate, in a thread, every answer counted by status class.

The requests come from the tests themselves, imported, not copied, so that a case added there
is soaked too:
- the bad-input matrix, `tests.test_hardening.BAD_INPUT` (27 uploads and tensors, each with
  the status it must get);
- the multipart fuzz, `tests.test_request_fuzz.uploads()` (hypothesis-built raw bodies), to
  /classify and /classify_batch/submit in the test's proportions (3 to 1), a new seed per round;
- the request size limit both ways tests/test_limits.py tries it: a head that declares a body
  over the limit, and a chunked body streamed until the server refuses it.

A round is every matrix case, the two size-limit requests and `FUZZ_PER_ROUND` fuzzed bodies,
sent one at a time, `rate` per second; rounds repeat until `stop()`.
"""

from __future__ import annotations

import itertools
import json
import select
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import httpx

FUZZ_PER_ROUND = 60
FUZZ_ROUTES = ["/classify", "/classify", "/classify", "/classify_batch/submit"]
DECLARED_BYTES = 1_000_000_000  # any size over the limit: refused from the head alone
STREAM_CAP_BYTES = 256 * 2**20  # give up streaming (and count it unanswered) past this
CHUNK = b"\0" * 65536
PART_HEAD = (b'--x\r\nContent-Disposition: form-data; name="images"; filename="a.png"\r\n'
             b"Content-Type: image/png\r\n\r\n")
TIMEOUT_S = 60
KEPT_EXAMPLES = 5  # server errors and unexpected answers kept for the report, per kind


def status_class(status: int | None) -> str:
    return "no answer" if status is None else f"{status // 100}xx"


def error_body_ok(status: int, body: bytes) -> bool:
    """A refusal's body is exactly {"error": <code>, "detail": <text>}."""
    if status < 400:
        return True
    try:
        document = json.loads(body)
    except ValueError:
        return False
    return isinstance(document, dict) and set(document) == {"error", "detail"}


@dataclass
class Tally:
    """Abusive answers: by kind (matrix, fuzz, limit) and status class, and what went wrong."""

    answers: Counter[tuple[str, str]] = field(default_factory=Counter)
    unexpected: int = 0        # a matrix case or a size limit answered with another status
    bad_bodies: int = 0        # a 4xx/5xx whose body is not {"error", "detail"}
    examples: list[str] = field(default_factory=list)

    @property
    def sent(self) -> int:
        return sum(self.answers.values())

    def by_class(self, name: str) -> int:
        return sum(n for (_, cls), n in self.answers.items() if cls == name)

    def by_kind(self, kind: str) -> int:
        return sum(n for (k, _), n in self.answers.items() if k == kind)

    def record(self, kind: str, name: str, status: int | None, body: bytes,
               expected: int | None = None) -> None:
        self.answers[(kind, status_class(status))] += 1
        wrong_status = expected is not None and status != expected
        wrong_body = status is not None and not error_body_ok(status, body)
        self.unexpected += wrong_status
        self.bad_bodies += wrong_body
        if (status is None or status >= 500 or wrong_status or wrong_body) \
                and sum(e.startswith(kind) for e in self.examples) < KEPT_EXAMPLES:
            self.examples.append(f"{kind} {name}: {status} (expected {expected or 'a 2xx/4xx'})"
                                 f" {body[:200]!r}")


class AbusiveTraffic:
    """Sends the rounds in a thread from start() until stop(), one request at a time (so at
    less than `rate` when answers take longer than 1/rate); `take()` hands over what was counted
    since the last take (one Tally per phase of the soak)."""

    def __init__(self, url: str, rate: float) -> None:
        self.url, self.interval_s = url, 1 / rate
        self._tally, self._lock = Tally(), threading.Lock()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="abuse")
        self._next = 0.0
        self.error: BaseException | None = None

    def start(self) -> AbusiveTraffic:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop sending; `error` says why it stopped early, if it did."""
        self._stopped.set()
        self._thread.join()

    def take(self) -> Tally:
        with self._lock:
            taken, self._tally = self._tally, Tally()
        return taken

    def _record(self, kind: str, name: str, status: int | None, body: bytes,
                expected: int | None = None) -> None:
        with self._lock:
            self._tally.record(kind, name, status, body, expected)

    def _pace(self) -> bool:
        """Wait for the next send time; False once stopped."""
        now = time.monotonic()
        self._next = max(self._next + self.interval_s, now)
        return not self._stopped.wait(self._next - now)

    def _run(self) -> None:
        try:
            from tests.test_hardening import BAD_INPUT

            matrix = [(name, case.route, case.status, case.request())  # built once: bombs
                      for name, case in BAD_INPUT.items()]               # take a second
            with httpx.Client(base_url=self.url, timeout=TIMEOUT_S) as client:
                for round_number in itertools.count():
                    for name, route, expected, request in matrix:
                        if not self._pace():
                            return
                        self._send(client, "matrix", name, route, request, expected)
                    for name, limit in (("declared", self._declared_too_large),
                                        ("streamed", self._streamed_too_large)):
                        if not self._pace():
                            return
                        status, body = limit()
                        self._record("limit", name, status, body, expected=413)
                    self._fuzz(client, round_number)
                    if self._stopped.is_set():
                        return
        except Exception as exc:  # reported by the soak, which goes on with its valid load
            self.error = exc

    def _send(self, client: httpx.Client, kind: str, name: str, route: str,
              request: dict[str, Any], expected: int | None = None) -> None:
        try:
            response = client.post(route, **request)
        except httpx.HTTPError as exc:
            self._record(kind, name, None, repr(exc).encode(), expected)
            return
        self._record(kind, name, response.status_code, response.content, expected)

    def _fuzz(self, client: httpx.Client, round_number: int) -> None:
        from hypothesis import HealthCheck, Phase, given, seed, settings
        from hypothesis import strategies as st

        from tests.test_request_fuzz import Upload, uploads

        @settings(max_examples=FUZZ_PER_ROUND, deadline=None, database=None,
                  phases=[Phase.generate], suppress_health_check=list(HealthCheck))
        @seed(round_number)
        @given(upload=uploads(), route=st.sampled_from(FUZZ_ROUTES))
        def send(upload: Upload, route: str) -> None:
            if self._pace():  # once stopped, the remaining examples are drawn and not sent
                self._send(client, "fuzz", f"{route} {upload!r}"[:300], route,
                           {"content": upload.body,
                            "headers": {"Content-Type": upload.content_type}})

        send()

    def _declared_too_large(self) -> tuple[int | None, bytes]:
        """tests/test_limits.py: a head announcing a body over the limit, and no body."""
        return self._raw({"Content-Type": "multipart/form-data; boundary=x",
                          "Content-Length": str(DECLARED_BYTES)}, b"", stream=False)

    def _streamed_too_large(self) -> tuple[int | None, bytes]:
        """tests/test_limits.py: a chunked upload (no Content-Length) that goes on until the
        server answers."""
        return self._raw({"Content-Type": "multipart/form-data; boundary=x",
                          "Transfer-Encoding": "chunked"},
                         f"{len(PART_HEAD):x}\r\n".encode() + PART_HEAD + b"\r\n", stream=True)

    def _raw(self, headers: dict[str, str], first: bytes, stream: bool
             ) -> tuple[int | None, bytes]:
        import http.client

        host, port = self.url.removeprefix("http://").split(":")
        head = f"POST /classify HTTP/1.1\r\nHost: {host}\r\n" + "".join(
            f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
        try:
            with socket.create_connection((host, int(port)), timeout=TIMEOUT_S) as sock:
                sock.sendall(head.encode() + first)
                sent = 0
                while stream and sent < STREAM_CAP_BYTES \
                        and not select.select([sock], [], [], 0)[0]:  # no answer yet
                    try:
                        sock.sendall(f"{len(CHUNK):x}\r\n".encode() + CHUNK + b"\r\n")
                    except (BrokenPipeError, ConnectionResetError):
                        break  # refused mid-chunk: its answer is still there to read
                    sent += len(CHUNK)
                response = http.client.HTTPResponse(sock)
                response.begin()
                return response.status, response.read()
        except (OSError, http.client.HTTPException) as exc:
            return None, repr(exc).encode()
