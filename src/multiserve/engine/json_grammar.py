"""GBNF for a JSON schema: llama-cpp-python's converter, brought in line with llama.cpp's own.

The converter (a Python port of llama.cpp's) lags it in three ways that matter here, each
patched: it lets raw control characters into strings (invalid JSON, refused by strict parsers);
it allows only a single space between tokens, so a model that writes `{\n  "city"` is refused at
nearly every step (each refusal costs a grammar pass over the whole vocabulary); and it drops
integer `minimum`/`maximum`, so `{"maximum": 7}` would let a 9 through.
"""

from __future__ import annotations

import json
import math

from llama_cpp.llama_grammar import JSON_GBNF, json_schema_to_gbnf

ANY_JSON_OBJECT = JSON_GBNF  # `response_format: json_object`
# A JSON string: no raw control characters, escapes as JSON has them.
JSON_STRING = (
    '"\\"" ( [^"\\\\\\x7F\\x00-\\x1F] | "\\\\" (["\\\\/bfnrt] | '
    '"u" [0-9a-fA-F] [0-9a-fA-F] [0-9a-fA-F] [0-9a-fA-F]) )* "\\""'
)
_LOOSE_CHAR = 'char ::= [^"\\\\] |'
_JSON_CHAR = 'char ::= [^"\\\\\\x7F\\x00-\\x1F] |'
_SINGLE_SPACE = 'space ::= " "?'
_SPACE = 'space ::= | " " | "\\n"{1,2} [ \\t]{0,20}'  # llama.cpp's: newlines and indentation
# Integer ranges up to this size are spelled out as an enum.
MAX_SPELLED_RANGE = 1024


class SchemaNotEnforceable(ValueError):
    """The converter cannot express the schema; the message says why."""


def json_schema_grammar(schema: object) -> str:
    """GBNF whose `root` matches exactly the JSON documents `schema` allows (bounds as above)."""
    try:
        rules = json_schema_to_gbnf(json.dumps(with_enforced_bounds(schema)))
    except Exception as exc:  # the converter also signals bad schemas with bare asserts
        raise SchemaNotEnforceable(str(exc)) from None
    return rules.replace(_LOOSE_CHAR, _JSON_CHAR).replace(_SINGLE_SPACE, _SPACE)


def with_enforced_bounds(schema: object) -> object:
    """`schema` with each bounded integer spelled out as an enum of its values."""
    if isinstance(schema, list):
        return [with_enforced_bounds(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    node = {key: with_enforced_bounds(value) for key, value in schema.items()}
    if node.get("type") == "integer" and "enum" not in node:
        low = _bound(node, "minimum", "exclusiveMinimum", lower=True)
        high = _bound(node, "maximum", "exclusiveMaximum", lower=False)
        if low is not None and high is not None and 0 <= high - low < MAX_SPELLED_RANGE:
            return {"enum": list(range(low, high + 1))}
    return node


def _bound(node: dict, inclusive: str, exclusive: str, lower: bool) -> int | None:
    """The tightest integer bound on one side, from the inclusive and exclusive keywords."""
    candidates = []
    if isinstance(node.get(inclusive), int | float):
        edge = node[inclusive]
        candidates.append(math.ceil(edge) if lower else math.floor(edge))
    if isinstance(node.get(exclusive), int | float):
        edge = node[exclusive]
        candidates.append(math.floor(edge) + 1 if lower else math.ceil(edge) - 1)
    if not candidates:
        return None
    return max(candidates) if lower else min(candidates)
