"""A request's per-record `info`: the JSON object the dataset record carried.

`ScoreRequest` and `ResetRequest` gain an `info` field in a Tandem that forwards each
record's `info`; an older Tandem sends none. `read_info` works with both: it looks the
field up by name in the request's descriptor (never by attribute access that would
fail on the older stubs), accepts the forms such a field can take (a JSON string,
bytes of JSON, a `google.protobuf.Struct`, a map of strings) and gives `{}` when the
request carries none.
"""

from __future__ import annotations

import json
from typing import Any

#: Field names read, in order.
FIELD_NAMES = ("info", "info_json")


class InfoError(ValueError):
    """The request's `info` is present but not a JSON object."""


def read_info(request: Any) -> dict[str, Any]:
    """The `info` object of `request` (a `ScoreRequest` or `ResetRequest`), `{}` when absent.

    Raises `InfoError` when the field holds something other than a JSON object.
    """
    fields = request.DESCRIPTOR.fields_by_name
    for name in FIELD_NAMES:
        field = fields.get(name)
        if field is None:
            continue
        value = getattr(request, name)
        if field.message_type is not None and not _is_repeated(field):
            # A message (google.protobuf.Struct): present only when set.
            if not request.HasField(name):
                return {}
            from google.protobuf import json_format

            parsed: Any = json_format.MessageToDict(value, preserving_proto_field_name=True)
        elif field.message_type is not None:
            # map<string, string> (a repeated entry message in the descriptor).
            parsed = dict(value)
        elif isinstance(value, (bytes, bytearray)):
            parsed = _json(bytes(value).decode("utf-8", errors="strict"), name)
        elif isinstance(value, str):
            parsed = _json(value, name)
        else:
            raise InfoError(f"`{name}` has type {type(value).__name__}; expected JSON text or a Struct")
        if parsed is None:
            return {}
        if not isinstance(parsed, dict):
            raise InfoError(f"`{name}` must be a JSON object, got {type(parsed).__name__}")
        return parsed
    return {}


def _is_repeated(field: Any) -> bool:
    # `label` is deprecated in newer protobuf; `is_repeated` is not in older ones.
    rep = getattr(field, "is_repeated", None)
    if rep is not None:
        return bool(rep() if callable(rep) else rep)
    return field.label == field.LABEL_REPEATED


def _json(text: str, name: str) -> Any:
    if not text.strip():
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise InfoError(f"`{name}` is not valid JSON: {e}") from e
