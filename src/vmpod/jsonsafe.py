"""JSON from outside (users, engines, images, registries, plugins): parsed so that
nesting past reason is an ordinary error, never a RecursionError traceback."""

from __future__ import annotations

import json
from typing import Any

# far deeper than any OCI document (config.json is about 6 levels deep), far below
# what the parser and every later json.dumps can take on Python's stack
MAX_JSON_DEPTH = 64


def parse_json(text: str | bytes) -> Any:
    """``json.loads`` for foreign input: nesting deeper than MAX_JSON_DEPTH is a
    ValueError (as malformed JSON is), never a RecursionError."""
    try:
        data = json.loads(text)
    except RecursionError:
        raise ValueError(f"nested too deeply (more than {MAX_JSON_DEPTH} levels)") from None
    if json_depth(data) > MAX_JSON_DEPTH:
        raise ValueError(f"nested too deeply (more than {MAX_JSON_DEPTH} levels)")
    return data


def json_depth(data: object) -> int:
    """How deeply ``data``'s lists and objects nest (a scalar: 0), without recursion."""
    deepest = 0
    stack: list[tuple[object, int]] = [(data, 0)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, dict):
            children: list[object] = list(value.values())
        elif isinstance(value, list):
            children = value
        else:
            continue
        deepest = max(deepest, depth + 1)
        if deepest > MAX_JSON_DEPTH:
            return deepest
        stack.extend((child, depth + 1) for child in children)
    return deepest


__all__ = ["MAX_JSON_DEPTH", "json_depth", "parse_json"]
