"""Request structure, fuzzed against a real `bentoml serve`: multipart bodies built byte by byte
by hypothesis (parts without a name or a Content-Disposition, a field twice, text where a file
belongs and bytes where text belongs, non-UTF-8 names, filenames and values, thousands of parts,
long header lines, nested multipart, a missing or cut closing boundary), and every route with
other methods, unknown or missing task ids, invalid JSON and wrong JSON types.

Each answer is a 2xx, or a 4xx whose body is exactly `{"error": <code>, "detail": <text>}`;
never a 5xx; and the server answers a valid request afterwards. Derandomized, so a CI run sends
the same requests every time."""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.helpers import ROOT, RunningServer

pytestmark = pytest.mark.e2e

MULTIPART_EXAMPLES = 1100  # the classifier's; the issue asks for at least 1000 requests in all
DETECTOR_EXAMPLES = 250
ROUTE_EXAMPLES = 300


def fuzz_settings(examples: int) -> settings:
    """Reproducible: derandomized, no example database; no deadline (a loaded CI machine)."""
    return settings(max_examples=examples, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.large_base_example])


DIGIT = (ROOT / "examples" / "digit_7_00.png").read_bytes()
CRLF = b"\r\n"


@dataclass
class Tally:
    """What the server answered, by route, status and error code."""

    answers: Counter[tuple[str, int, str]] = field(default_factory=Counter)

    def check(self, route: str, response: httpx.Response) -> None:
        status = response.status_code
        assert status < 500, f"{route}: {status} {response.text[:500]}"
        code = ""
        if status >= 400 and response.request.method != "HEAD":  # HEAD: no body
            body = response.json() if response.content else None
            assert isinstance(body, dict) and set(body) == {"error", "detail"}, \
                f"{route}: {status} answered {response.text[:500]!r}, not {{error, detail}}"
            assert all(isinstance(v, str) and v for v in body.values()), body
            code = body["error"]
        self.answers[(route, status, code)] += 1

    @property
    def total(self) -> int:
        return sum(self.answers.values())

    def summary(self) -> str:
        return "\n".join(f"  {n:5d}  {route} {status} {code}"
                         for (route, status, code), n in sorted(self.answers.items()))


# --- multipart bodies, byte by byte --------------------------------------------------------------

ODD_BYTES = st.binary(min_size=1, max_size=12).filter(lambda b: b"\r" not in b and b"\n" not in b)
NAMES = st.one_of(
    st.just(b"images"),
    st.sampled_from([b"images", b"image", b"Images", b"files", b"", b"images[]",
                     b"confidence_threshold", b"iou_threshold", b"max_detections",
                     b"pixels", b"images\xff", b"\xe9\xe8"]),
    ODD_BYTES.filter(lambda b: b'"' not in b and b";" not in b),
)
FILENAMES = st.one_of(st.none(), st.sampled_from([b"7.png", b"", b"../../etc/passwd",
                                                 b"\xff\xfe.png", b"a;b.png", b"\xe2\x82\xac.jpg"]),
                      ODD_BYTES.filter(lambda b: b'"' not in b))
CONTENT_TYPES = st.one_of(st.none(), st.sampled_from([
    b"image/png", b"image/jpeg", b"text/plain", b"text/plain; charset=latin-1",
    b"application/octet-stream", b"application/json", b"multipart/mixed; boundary=inner",
    b"\xff\xfe/\x00", b""]))


def nested_multipart(inner: bytes) -> bytes:
    return (b"--inner\r\nContent-Disposition: form-data; name=\"images\"; filename=\"7.png\"\r\n"
            b"Content-Type: image/png\r\n\r\n" + inner + b"\r\n--inner--\r\n")


CONTENTS = st.one_of(
    st.just(DIGIT),
    st.just(DIGIT),
    st.just(DIGIT[: len(DIGIT) // 2]),  # a cut image
    st.just(b""),
    st.sampled_from([b"0.7", b"-1", b"nan", b"1e309", b"abc", b"http://127.0.0.1:9/x.png",
                     b"{\"a\": 1}", b"\xff\xfe\xfd", "\u00e9t\u00e9".encode("utf-16")]),
    st.binary(max_size=300),
    st.just(DIGIT).map(nested_multipart),
)


@st.composite
def part(draw: st.DrawFn, boundary: bytes, hostile: bool) -> bytes:
    """One part: a Content-Disposition (or, `hostile`, none or a broken one), maybe a
    Content-Type, maybe (`hostile`) an odd or very long header, then the content."""
    name, filename = draw(NAMES), draw(FILENAMES)
    disposition = draw(st.sampled_from(["full"] * 4 + ["no-name", "none", "star", "no-quotes",
                                                        "other-type"])) if hostile else "full"
    headers: list[bytes] = []
    if disposition == "full":
        value = b'form-data; name="' + name + b'"'
        if filename is not None:
            value += b'; filename="' + filename + b'"'
        headers.append(b"Content-Disposition: " + value)
    elif disposition == "no-name":
        headers.append(b'Content-Disposition: form-data; filename="' + (filename or b"") + b'"')
    elif disposition == "star":
        headers.append(b"Content-Disposition: form-data; name*=UTF-8''%e2%82%ac")
    elif disposition == "no-quotes":
        headers.append(b"Content-Disposition: form-data; name=" + name)
    elif disposition == "other-type":
        headers.append(b'Content-Disposition: attachment; name="' + name + b'"')
    content_type = draw(CONTENT_TYPES)
    if content_type is not None:
        headers.append(b"Content-Type: " + content_type)
    extra = draw(st.sampled_from(["", "", "long", "very-long", "no-colon", "odd"])) \
        if hostile else ""
    if extra == "long":
        headers.append(b"X-Padding: " + b"a" * 8_000)
    elif extra == "very-long":
        headers.append(b"X-Padding: " + b"a" * 200_000)
    elif extra == "no-colon":
        headers.append(b"this header has no colon")
    elif extra == "odd":
        headers.append(b"X-Odd: " + draw(ODD_BYTES))
    if draw(st.booleans()):
        headers.reverse()
    content = draw(CONTENTS)
    return b"--" + boundary + CRLF + CRLF.join(headers) + CRLF + CRLF + content + CRLF


def image_part(boundary: bytes, filename: bytes) -> bytes:
    return (b"--" + boundary + b'\r\nContent-Disposition: form-data; name="images"; filename="'
            + filename + b'"\r\nContent-Type: image/png\r\n\r\n' + DIGIT + CRLF)


BOUNDARIES = st.one_of(
    st.just(b"fuzz-boundary"),
    st.text("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789'()+_,-./:=?",
            min_size=1, max_size=70).map(str.encode),
)


@dataclass
class Upload:
    body: bytes
    content_type: bytes

    def __repr__(self) -> str:  # what hypothesis prints for a failing example
        return f"Upload(content_type={self.content_type!r}, body={self.body[:2000]!r}...)"


@st.composite
def uploads(draw: st.DrawFn) -> Upload:
    """A multipart body and its Content-Type: parts in any mix, ended well or not."""
    boundary = draw(BOUNDARIES)
    if draw(st.integers(0, 3)) == 0:  # a well-formed upload, maybe with an option
        parts = [image_part(boundary, draw(FILENAMES.filter(bool))) for _ in
                 range(draw(st.integers(1, 3)))]
        if draw(st.booleans()):
            parts.append(draw(part(boundary, hostile=False)))
    else:
        parts = draw(st.lists(part(boundary, hostile=draw(st.integers(0, 3)) == 1),
                              max_size=6))
    if draw(st.integers(0, 19)) == 7:  # thousands of parts
        many = b'--' + boundary + b'\r\nContent-Disposition: form-data; name="images"; ' \
            b'filename="p.png"\r\n\r\nx\r\n'
        parts.append(many * draw(st.integers(900, 2_500)))
    body = b"".join(parts)
    ending = draw(st.sampled_from(["close"] * 8 + ["none", "cut", "epilogue", "no-dashes",
                                                   "preamble"]))
    if ending == "close":
        body += b"--" + boundary + b"--\r\n"
    elif ending == "cut" and body:
        body = body[: draw(st.integers(0, len(body) - 1))]
    elif ending == "epilogue":
        body += b"--" + boundary + b"--\r\n" + draw(st.binary(max_size=50))
    elif ending == "no-dashes":
        body += b"--" + boundary + CRLF
    elif ending == "preamble":
        body = b"a preamble\r\n" + body + b"--" + boundary + b"--\r\n"
    header = draw(st.sampled_from([
        *[b"multipart/form-data; boundary=" + boundary] * 8,
        b'multipart/form-data; boundary="' + boundary + b'"',
        b"multipart/form-data; charset=latin-1; boundary=" + boundary,
        b"multipart/form-data; charset=no-such-charset; boundary=" + boundary,
        b"multipart/form-data; boundary=another",
        b"multipart/form-data",
        b"multipart/form-data; boundary=",
        b"multipart/form-data; boundary=\xff\xfe",
        b"multipart/mixed; boundary=" + boundary,
    ]))
    return Upload(body, header)


def post(url: str, route: str, upload: Upload) -> httpx.Response:
    return httpx.post(url + route, content=upload.body,
                      headers={"Content-Type": upload.content_type}, timeout=60)


def check_job(url: str, route: str, submitted: httpx.Response, tally: Tally) -> None:
    """A job's submit answers at once; its body is parsed after: its result must be a 2xx or
    one of our refusals too."""
    if submitted.status_code != 200:
        return
    task_id = submitted.json()["task_id"]
    deadline = time.monotonic() + 60
    while True:
        status = httpx.get(f"{url}{route}/status", params={"task_id": task_id}, timeout=30)
        tally.check(f"{route}/status", status)
        if status.json()["status"] != "in_progress" or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    tally.check(f"{route}/get", httpx.get(f"{url}{route}/get", params={"task_id": task_id},
                                          timeout=30))


def fuzz_multipart(url: str, routes: list[str], examples: int, tally: Tally) -> None:
    @fuzz_settings(examples)
    @given(upload=uploads(), route=st.sampled_from(routes))
    def send(upload: Upload, route: str) -> None:
        response = post(url, route, upload)
        tally.check(route, response)
        if route.endswith("/submit"):
            check_job(url, route.removesuffix("/submit"), response, tally)

    send()


def answers_a_valid_request(url: str, route: str) -> None:
    response = httpx.post(url + route, files=[("images", ("7.png", DIGIT, "image/png"))],
                          timeout=60)
    assert response.status_code == 200, response.text


def test_multipart_structures_never_get_a_server_error(server: RunningServer) -> None:
    tally = Tally()
    fuzz_multipart(server.url, ["/classify", "/classify", "/classify", "/classify_batch/submit"],
                   MULTIPART_EXAMPLES, tally)
    print(f"\n{tally.total} requests to the classifier:\n{tally.summary()}")
    assert tally.total >= 1000, tally.summary()
    refused = {code for (_, status, code) in tally.answers if status >= 400}
    assert {"invalid_multipart", "missing_input", "unexpected_part", "not_a_file"} <= refused, \
        f"the generated bodies miss a kind of refusal: {sorted(refused)}"
    assert any(status == 200 for (_, status, _) in tally.answers), "no valid body was generated"
    assert server.running()
    answers_a_valid_request(server.url, "/classify")


def test_detector_multipart_structures_never_get_a_server_error(
        detector_server: RunningServer) -> None:
    tally = Tally()
    fuzz_multipart(detector_server.url, ["/detect", "/detect", "/detect_batch/submit"],
                   DETECTOR_EXAMPLES, tally)
    print(f"\n{tally.total} requests to the detector:\n{tally.summary()}")
    assert tally.total >= DETECTOR_EXAMPLES
    assert detector_server.running()
    answers_a_valid_request(detector_server.url, "/detect")


# --- every route: methods, task ids, JSON ---------------------------------------------------------

METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner,
                                                                 max_size=4),
    max_leaves=12)
TASK_IDS = st.one_of(st.none(), st.just(""), st.text(max_size=40),
                     st.text("0123456789abcdef", min_size=32, max_size=32))


@st.composite
def json_bodies(draw: st.DrawFn, keys: list[str]) -> bytes:
    """Invalid JSON, JSON of the wrong type, or an object with the route's keys holding any
    JSON value."""
    kind = draw(st.sampled_from(["object", "object", "any", "invalid", "bytes"]))
    if kind == "object":
        document = draw(st.dictionaries(st.sampled_from([*keys, "other"]), JSON_VALUES,
                                        max_size=3))
        return json.dumps(document).encode()
    if kind == "any":
        return json.dumps(draw(JSON_VALUES)).encode()
    if kind == "invalid":
        return draw(st.sampled_from([b"{", b'{"pixels": [1, 2', b"NaN", b"{'a': 1}", b"[1,]",
                                     b'{"test_now": tru}', b"\xef\xbb\xbf{}"]))
    return draw(st.binary(max_size=64))


def spec_routes(url: str) -> dict[str, dict[str, list[str]]]:
    """Every path of the OpenAPI spec: its methods and its JSON body's keys."""
    spec = httpx.get(f"{url}/docs.json", timeout=30).json()
    schemas = spec.get("components", {}).get("schemas", {})
    routes = {}
    for path, operations in spec["paths"].items():
        keys: list[str] = []
        for operation in operations.values():
            content = operation.get("requestBody", {}).get("content", {})
            schema = content.get("application/json", {}).get("schema", {})
            schema = schemas.get(schema.get("$ref", "").rsplit("/", 1)[-1], schema)
            keys += list(schema.get("properties", {}))
        routes[path] = {"methods": [m.upper() for m in operations], "keys": keys}
    return routes


def fuzz_routes(url: str, examples: int, tally: Tally) -> None:
    routes = spec_routes(url)

    @fuzz_settings(examples)
    @given(data=st.data())
    def send(data: st.DataObject) -> None:
        path = data.draw(st.sampled_from(sorted(routes)), label="path")
        method = data.draw(st.sampled_from(routes[path]["methods"] * len(METHODS) + METHODS),
                           label="method")
        params = {}
        if path.rsplit("/", 1)[-1] in {"status", "get", "retry", "cancel"}:
            task_id = data.draw(TASK_IDS, label="task_id")
            params = {} if task_id is None else {"task_id": task_id}
        body = data.draw(json_bodies(routes[path]["keys"]), label="body")
        content_type = data.draw(st.sampled_from(["application/json", "application/json",
                                                  "text/plain", None]), label="content_type")
        headers = {"Content-Type": content_type} if content_type else {}
        if path.endswith("/submit") or path in ("/classify", "/detect", "/classify_batch",
                                                "/detect_batch"):
            headers = {}  # multipart routes: the multipart fuzz covers their bodies
            body = b""
        response = httpx.request(method, url + path, params=params, content=body or None,
                                 headers=headers, timeout=60)
        tally.check(f"{method} {path}", response)

    send()


@pytest.mark.parametrize("which", ["server", "detector_server"])
def test_every_route_with_any_method_task_id_or_json(which: str,
                                                     request: pytest.FixtureRequest) -> None:
    running: RunningServer = request.getfixturevalue(which)
    tally = Tally()
    fuzz_routes(running.url, ROUTE_EXAMPLES, tally)
    print(f"\n{tally.total} requests to {which}:\n{tally.summary()}")
    refused = {code for (_, _, code) in tally.answers}
    assert {"method_not_allowed", "unknown_task", "missing_input"} <= refused, sorted(refused)
    assert running.running()
    answers_a_valid_request(running.url, "/classify" if which == "server" else "/detect")


def test_job_routes_answer_every_task_id_question(server: RunningServer) -> None:
    """The job routes' answers, one by one: a missing or unknown task id, a job still running,
    a cancel; and a finished job's result and retry."""
    url = server.url
    expected: dict[str, Callable[[], httpx.Response]] = {
        "missing_input": lambda: httpx.get(f"{url}/classify_batch/status"),
        "unknown_task": lambda: httpx.get(f"{url}/classify_batch/get", params={"task_id": "x"}),
        "cancel_not_supported": lambda: httpx.put(f"{url}/classify_batch/cancel",
                                                  params={"task_id": "x"}),
        "method_not_allowed": lambda: httpx.delete(f"{url}/classify_batch/status",
                                                   params={"task_id": "x"}),
        "not_found": lambda: httpx.get(f"{url}/classify_batch/nothing"),
    }
    for code, send in expected.items():
        response = send()
        assert response.json()["error"] == code, response.text
        assert set(response.json()) == {"error", "detail"}, response.text
    submitted = httpx.post(f"{url}/classify_batch/submit", timeout=30,
                           files=[("images", ("7.png", DIGIT, "image/png"))]).json()
    deadline = time.monotonic() + 60
    while httpx.get(f"{url}/classify_batch/status", params=submitted).json()["status"] \
            == "in_progress" and time.monotonic() < deadline:
        time.sleep(0.1)
    result = httpx.get(f"{url}/classify_batch/get", params={"task_id": submitted["task_id"]})
    assert result.status_code == 200 and result.json()[0]["prediction"]["label"] == "7"
    retried = httpx.post(f"{url}/classify_batch/retry", params={"task_id": submitted["task_id"]})
    assert retried.status_code == 200 and retried.json()["task_id"] != submitted["task_id"]
