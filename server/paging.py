"""AIP-158 pagination: page sizes and opaque page tokens."""

from __future__ import annotations

import base64
from typing import Any

import orjson

from server.errors import Violation, invalid

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000


def page_size(requested: int, maximum: int | None = None, *, default: int | None = None) -> int:
    """0 → the default; above the maximum → the maximum; negative → INVALID_ARGUMENT.

    `default` and `maximum` are per RPC (AnalyzeImpact's pages are larger than a list's)."""
    maximum = MAX_PAGE_SIZE if maximum is None else maximum  # read at call time (tests lower it)
    default = DEFAULT_PAGE_SIZE if default is None else default
    if requested < 0:
        raise invalid("page_size must not be negative", [Violation("page_size", f"{requested} is negative")])
    return min(default, maximum) if requested == 0 else min(requested, maximum)


def encode_token(kind: str, key: Any) -> str:
    return base64.urlsafe_b64encode(orjson.dumps({"k": kind, "v": key})).decode("ascii")


def decode_token(kind: str, token: str) -> Any:
    """The key encoded by encode_token, or None for an empty token."""
    if not token:
        return None
    try:
        data = orjson.loads(base64.urlsafe_b64decode(token.encode("ascii")))
        if data.get("k") == kind:
            return data["v"]
    except (ValueError, TypeError, AttributeError, KeyError, UnicodeEncodeError):
        pass
    raise invalid("page_token is not a token this list returned", [Violation("page_token", "unknown or damaged token")])
