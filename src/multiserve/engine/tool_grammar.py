"""The grammar that holds tool calls to their schemas, in the family's own layout.

Each call is `{"name": <one of the tools>, "<arguments key>": <that tool's parameters>}`, from
llama-cpp-python's JSON-schema converter, wrapped in the layout's literal text. When the family
starts its calls with a special token and a call is optional, the grammar waits for that token
(the text before it is free); otherwise it holds from the first token.
"""

from __future__ import annotations

import json
import math
import re

from llama_cpp.llama_grammar import json_schema_to_gbnf

from multiserve.engine.protocol import ToolConstraint
from multiserve.tools.layouts import LLAMA3, RESPONSE_OPENING

# The converter lets raw control characters into strings; JSON (and a strict client) does not.
_LOOSE_CHAR = 'char ::= [^"\\\\] |'
_JSON_CHAR = 'char ::= [^"\\\\\\x7F\\x00-\\x1F] |'
_STRICT_STRING = (
    'tool-string ::= "\\"" ( [^"\\\\\\x7F\\x00-\\x1F] | "\\\\" (["\\\\/bfnrt] | '
    '"u" [0-9a-fA-F] [0-9a-fA-F] [0-9a-fA-F] [0-9a-fA-F]) )* "\\""'
)


# Integer bounds the converter ignores; ranges up to this size are spelled out as an enum.
MAX_SPELLED_RANGE = 1024


def with_enforced_bounds(schema: object) -> object:
    """`schema` with bounded integers as enums: llama-cpp-python's converter drops `minimum` and
    `maximum`, so `{"type": "integer", "maximum": 7}` would let a 9 through."""
    if isinstance(schema, list):
        return [with_enforced_bounds(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    node = {key: with_enforced_bounds(value) for key, value in schema.items()}
    if node.get("type") == "integer" and "enum" not in node:
        low = _bound(node, "minimum", "exclusiveMinimum", +1)
        high = _bound(node, "maximum", "exclusiveMaximum", -1)
        if low is not None and high is not None and 0 <= high - low < MAX_SPELLED_RANGE:
            return {"enum": list(range(low, high + 1))}
    return node


def _bound(node: dict, inclusive: str, exclusive: str, step: int) -> int | None:
    values = []
    if isinstance(node.get(inclusive), int | float):
        values.append(math.ceil(node[inclusive]) if step > 0 else math.floor(node[inclusive]))
    if isinstance(node.get(exclusive), int | float):
        edge = node[exclusive]
        values.append(math.floor(edge) + 1 if step > 0 else math.ceil(edge) - 1)
    if not values:
        return None
    return max(values) if step > 0 else min(values)


class ToolSchemaError(ValueError):
    """A tool's parameters cannot be turned into a grammar; the message names the tool."""


class _Rule(str):
    """GBNF to splice in as is (a rule name or a group), among literal texts."""


def _sequence(*parts: str) -> _Rule:
    """GBNF matching the parts in order; plain strings are literal text (empty ones vanish)."""
    return _Rule(" ".join(p if isinstance(p, _Rule) else json.dumps(p) for p in parts if p))


def _call_rules(constraint: ToolConstraint) -> str:
    """Rules for one call object of any of the tools, its top rule named `tool-call`."""
    key = constraint.layout.arguments_key
    alternatives = []
    for name, parameters in constraint.tools:
        alternatives.append(
            {
                "type": "object",
                "properties": {
                    "name": {"const": name},
                    key: with_enforced_bounds(json.loads(parameters)),
                },
                "required": ["name", key],
            }
        )
    schema = alternatives[0] if len(alternatives) == 1 else {"anyOf": alternatives}
    try:
        rules = json_schema_to_gbnf(json.dumps(schema))
    except Exception as exc:  # the converter also signals bad schemas with bare asserts
        names = ", ".join(name for name, _ in constraint.tools)
        raise ToolSchemaError(f"tool parameters cannot be enforced ({names}): {exc}") from None
    rules = rules.replace(_LOOSE_CHAR, _JSON_CHAR)
    return re.sub(r"^root ::=", "tool-call ::=", rules, count=1, flags=re.MULTILINE)


def tool_grammar(constraint: ToolConstraint) -> str:
    """The whole GBNF for a choice that may (or must) call the tools."""
    layout = constraint.layout
    one = _sequence(layout.call_open, _Rule("tool-call"), layout.call_close)
    more = _Rule("")
    if constraint.parallel and layout.parallel:
        more = _Rule(f"({_sequence(layout.separator, one)})*")
    calls = _sequence(layout.opening, one, more, layout.closing)
    alternatives = [calls]
    extra = ""
    if not constraint.required and layout.response_envelope:
        alternatives.append(f'{_sequence(RESPONSE_OPENING)} tool-string "}}"')
        extra = _STRICT_STRING + "\n"
    elif not constraint.required and layout is LLAMA3:
        alternatives.append("tool-free-text")
        extra = "tool-free-text ::= [^{] [^\\x00]*\n"
    root = "root ::= " + " | ".join(f"( {a} )" for a in alternatives) + "\n"
    return root + extra + _call_rules(constraint)
