"""JSON bodies of ``POST /v1/colorize``: refused from their raw bytes when they would be costly to parse
(too deep, too many members, too many bytes besides the images), then parsed with duplicate keys and
overlong integers refused, and base64 images (plain or ``data:`` URLs of an accepted type) decoded."""

from __future__ import annotations

import base64
import binascii
import json
import re
from typing import Any

from serve.errors import ApiError, cap, quoted
from serve.params import IMAGE_FIELDS, PARAM_FIELDS, check_fields

# Caps on what a JSON body can make the app do before it is refused.
MAX_JSON_FIELDS_BYTES = 64 * 1024  # a JSON body less its (at most three) image strings
MAX_JSON_TOKENS = 256  # strings and brackets in a JSON body
MAX_JSON_DEPTH = 16


_BETWEEN_TOKENS = re.compile(rb'[^"\[\]{}]*')
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_LONG_STRING = 1024  # a string this long can only be an image
_TOO_LONG_INT = float("inf")  # what an integer of more than 20 digits parses to: refused as out of range


def check_json_shape(body: bytes) -> None:
    """Refuse a JSON body that would be costly to parse or validate, from its raw bytes (linear, in C): too
    deep, too many strings or brackets, or too many bytes besides its three longest strings (the images)."""
    depth = tokens = 0
    long_strings: list[int] = []
    position, end = 0, len(body)
    while True:
        position = _BETWEEN_TOKENS.match(body, position).end()
        if position >= end:
            break
        tokens += 1
        if tokens > MAX_JSON_TOKENS:
            raise ApiError(413, f"the JSON body has too many members (at most {MAX_JSON_TOKENS} strings and "
                                "brackets; the fields are a flat object)")
        if body[position] == 0x22:  # '"'
            string = _JSON_STRING.match(body, position)
            if string is None:
                raise ApiError(400, "body is not valid JSON: a string is not terminated")
            if string.end() - position > _LONG_STRING:
                long_strings.append(string.end() - position)
            position = string.end()
            continue
        depth += 1 if body[position] in b"[{" else -1
        if depth > MAX_JSON_DEPTH:
            raise ApiError(400, f"the JSON body is nested deeper than {MAX_JSON_DEPTH} levels")
        position += 1
    images = sum(sorted(long_strings)[-len(IMAGE_FIELDS):])
    if end - images > MAX_JSON_FIELDS_BYTES:
        raise ApiError(413, f"the JSON body's fields besides the images take {end - images} bytes; "
                            f"at most {MAX_JSON_FIELDS_BYTES}")


def _json_int(text: str) -> int | float:
    return int(text) if len(text) <= 20 else _TOO_LONG_INT


def _json_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    data = dict(pairs)
    if len(data) != len(pairs):
        seen: set[str] = set()
        twice = next(key for key, _ in pairs if key in seen or seen.add(key))
        raise ApiError(422, f"field {quoted(twice)} is given twice")
    return data


def parse_json(body: bytes) -> tuple[dict[str, Any], dict[str, str]]:
    """(fields, image strings) of a JSON body; shape checked first (CPU work: call it in a thread)."""
    check_json_shape(body)
    try:
        data = json.loads(body, parse_int=_json_int, object_pairs_hook=_json_object)
    except (ValueError, UnicodeDecodeError, RecursionError) as err:
        raise ApiError(400, f"body is not valid JSON: {cap(str(err), 120)}") from None
    if not isinstance(data, dict):
        raise ApiError(422, "the JSON body must be an object")
    check_fields(data, (*IMAGE_FIELDS, *PARAM_FIELDS))
    images: dict[str, str] = {}
    for name in IMAGE_FIELDS:
        value = data.pop(name, None)
        if value is None:
            continue
        if not isinstance(value, str):
            raise ApiError(422, f"{name}: must be a base64 string or a data:image/... URL")
        images[name] = value
    return data, images


_DATA_URL = re.compile(r"data:image/(png|jpeg|jpg|webp)((?:;[A-Za-z0-9=._+-]{1,64}){0,4}?);base64,", re.IGNORECASE)


def decode_base64(name: str, text: str) -> bytes:
    """A base64 field's bytes; a ``data:`` URL must declare an accepted image type and base64."""
    if text[:5].lower() == "data:":
        header = _DATA_URL.match(text[:400])
        if header is None:
            raise ApiError(422, f"{name}: a data: URL must be data:image/png, image/jpeg or image/webp with "
                                ";base64 (e.g. data:image/png;base64,...)")
        text = text[header.end():]
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        pass
    try:  # line-wrapped base64 (e.g. from `base64` without -w0)
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(422, f"{name} is not valid base64") from None
