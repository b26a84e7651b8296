"""The grammar that holds tool calls to their schemas, in the family's own layout.

Each call is `{"name": <one of the tools>, "<arguments key>": <that tool's parameters>}`, from
llama-cpp-python's JSON-schema converter, wrapped in the layout's literal text. When the family
starts its calls with a special token and a call is optional, the grammar waits for that token
(the text before it is free); otherwise it holds from the first token.
"""

from __future__ import annotations

import json
import re

from multiserve.engine.json_grammar import JSON_STRING, SchemaNotEnforceable, json_schema_grammar
from multiserve.engine.protocol import ToolConstraint
from multiserve.tools.layouts import LLAMA3, RESPONSE_OPENING


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
    definitions: dict[str, object] = {}
    for index, (name, parameters) in enumerate(constraint.tools):
        schema, own = _hoisted(json.loads(parameters), f"tool{index}_")
        definitions.update(own)
        alternatives.append(
            {
                "type": "object",
                "properties": {"name": {"const": name}, key: schema},
                "required": ["name", key],
            }
        )
    schema = alternatives[0] if len(alternatives) == 1 else {"anyOf": alternatives}
    if definitions:
        schema = {**schema, "$defs": definitions}
    try:
        rules = json_schema_grammar(schema)
    except SchemaNotEnforceable as exc:
        names = ", ".join(name for name, _ in constraint.tools)
        raise ToolSchemaError(f"tool parameters cannot be enforced ({names}): {exc}") from None
    return re.sub(r"^root ::=", "tool-call ::=", rules, count=1, flags=re.MULTILINE)


_DEFINITIONS = ("$defs", "definitions")


def _hoisted(parameters: dict, prefix: str) -> tuple[object, dict[str, object]]:
    """A tool's parameters without their definitions, and those definitions renamed with
    `prefix`: nested in the call's schema, `#/$defs/X` would point at the call, not the tool
    (pydantic models with nested models come with such references)."""
    renames: dict[str, str] = {}
    definitions: dict[str, object] = {}
    for section in _DEFINITIONS:
        for name, definition in (parameters.get(section) or {}).items():
            renames[f"#/{section}/{name}"] = f"#/$defs/{prefix}{name}"
            definitions[f"{prefix}{name}"] = definition

    def rewrite(node: object) -> object:
        if isinstance(node, list):
            return [rewrite(item) for item in node]
        if not isinstance(node, dict):
            return node
        out = {k: rewrite(v) for k, v in node.items() if k not in _DEFINITIONS}
        if node.get("$ref") in renames:
            out["$ref"] = renames[node["$ref"]]
        return out

    return rewrite(parameters), {name: rewrite(d) for name, d in definitions.items()}


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
        extra = f"tool-string ::= {JSON_STRING}\n"
    elif not constraint.required and layout is LLAMA3:
        alternatives.append("tool-free-text")
        extra = "tool-free-text ::= [^{] [^\\x00]*\n"
    root = "root ::= " + " | ".join(f"( {a} )" for a in alternatives) + "\n"
    return root + extra + _call_rules(constraint)
