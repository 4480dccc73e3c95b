"""A request's per-record `info`: the JSON object the dataset record carried.

Tandem sends a record's info (its `info` object, and with `[data] kind` its extra
columns) as `info_json` on every `ScoreRequest` and `ResetRequest`: the compact JSON
text of one object, at most 64 KiB, or empty when the record has none. `read_info`
parses it for the function or class the SDK serves: `{}` when empty, `InfoError` when
it is not one JSON object (a peer that is not Tandem).
"""

from __future__ import annotations

import json
from typing import Any


class InfoError(ValueError):
    """The request's `info_json` is not the JSON text of one object."""


def read_info(request: Any) -> dict[str, Any]:
    """The `info` object of `request` (a `ScoreRequest` or `ResetRequest`), `{}` when it
    carries none. Raises `InfoError` when `info_json` is not one JSON object."""
    text = request.info_json
    if not text.strip():
        return {}
    try:
        parsed = json.loads(text)
    except json.JSONDecodeError as e:
        raise InfoError(f"`info_json` is not JSON: {e}") from e
    if not isinstance(parsed, dict):
        raise InfoError(f"`info_json` must be a JSON object, got {type(parsed).__name__}")
    return parsed
