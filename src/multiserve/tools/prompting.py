"""What the chat template sees when a request carries tools or a history of tool calls.

Templates that render tools themselves (Qwen 2.5, Mistral, Llama 3.1) get them in the shape
Hugging Face templates expect: the OpenAI tool objects, assistant calls with their arguments as
objects (a JSON string would be encoded twice), and `tool` messages. Templates that know nothing
of tools get the generic layout instead: instructions and the tool list in the system prompt,
past calls written back as the JSON the model was asked for, and tool results as user turns (so
roles still alternate, as Gemma's and Aya's templates insist).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from multiserve.tools.layouts import MISTRAL, RESPONSE_OPENING, ToolLayout

GENERIC_INSTRUCTIONS = (
    "You can call the following tools. Respond with one JSON object and nothing else: either "
    '{"tool_calls": [{"name": "<tool name>", "arguments": {<arguments>}}]} to call tools, or '
    + RESPONSE_OPENING
    + '"<your answer>"} to answer the user directly.\n\nTools:\n'
)


def mistral_id(call_id: str) -> str:
    """Mistral's templates insist on 9-character ids: a stable one derived from the client's."""
    return hashlib.sha256(call_id.encode()).hexdigest()[:9]


def _arguments(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text  # rendered as given; the template decides


def template_messages(
    messages: list[dict[str, Any]], layout: ToolLayout, native: bool, tools: list[dict] | None
) -> list[dict[str, Any]]:
    """`messages` (OpenAI chat messages as dicts) turned into what this template expects."""
    if native:
        return [_native(m, layout) for m in messages]
    out = [_generic(m) for m in messages]
    if tools:
        listing = GENERIC_INSTRUCTIONS + "\n".join(json.dumps(t["function"]) for t in tools)
        if out and out[0]["role"] == "system":
            out[0] = {**out[0], "content": out[0]["content"] + "\n\n" + listing}
        else:
            out.insert(0, {"role": "system", "content": listing})
    return _merge_user_turns(out)


def _native(message: dict[str, Any], layout: ToolLayout) -> dict[str, Any]:
    ids = mistral_id if layout is MISTRAL else str
    if message.get("tool_calls"):
        calls = [
            {
                "id": ids(call["id"]),
                "type": "function",
                "function": {
                    "name": call["function"]["name"],
                    "arguments": _arguments(call["function"]["arguments"]),
                },
            }
            for call in message["tool_calls"]
        ]
        return {"role": "assistant", "content": message.get("content") or "", "tool_calls": calls}
    if message["role"] == "tool":
        content = message["content"]
        if layout is MISTRAL:  # its template writes the content unquoted into JSON
            content = json.dumps(content, ensure_ascii=False)
        return {
            "role": "tool",
            "content": content,
            "tool_call_id": ids(message["tool_call_id"]),
            **({"name": message["name"]} if message.get("name") else {}),
        }
    return message


def _generic(message: dict[str, Any]) -> dict[str, Any]:
    if message.get("tool_calls"):
        calls = [
            {"name": c["function"]["name"], "arguments": _arguments(c["function"]["arguments"])}
            for c in message["tool_calls"]
        ]
        return {"role": "assistant", "content": json.dumps({"tool_calls": calls})}
    if message["role"] == "tool":
        response = {"tool_call_id": message["tool_call_id"], "content": message["content"]}
        if message.get("name"):
            response["name"] = message["name"]
        return {"role": "user", "content": json.dumps({"tool_response": response})}
    return message


def _merge_user_turns(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Adjacent user turns (tool results, then perhaps the user) as one turn."""
    merged: list[dict[str, Any]] = []
    for message in messages:
        if merged and message["role"] == "user" and merged[-1]["role"] == "user":
            merged[-1] = {
                **merged[-1],
                "content": merged[-1]["content"] + "\n" + message["content"],
            }
        else:
            merged.append(dict(message))
    return merged
