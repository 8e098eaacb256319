"""A schemathesis check for tests/test_hardening.py, loaded by `schemathesis run` through
SCHEMATHESIS_HOOKS: every 4xx answer is exactly `{"error": <code>, "detail": <text>}`."""

from __future__ import annotations

import json
from typing import Any

import schemathesis


@schemathesis.check
def error_body_shape(ctx: Any, response: Any, case: Any) -> bool | None:
    if not 400 <= response.status_code < 500 or case.method.upper() == "HEAD":
        return None
    try:
        body = json.loads(response.content)
    except ValueError:
        raise AssertionError(f"a {response.status_code} answer that is not JSON: "
                             f"{response.content[:300]!r}") from None
    if not (isinstance(body, dict) and set(body) == {"error", "detail"}
            and all(isinstance(v, str) for v in body.values())):
        raise AssertionError(f"a {response.status_code} answer that is not "
                             f"{{error, detail}}: {body!r}")
    return None
