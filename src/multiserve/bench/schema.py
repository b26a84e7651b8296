"""JSON Schema (draft 2020-12) of a `multiserve bench --out` results file.

It pins the vLLM-named summary fields and the run's conditions, so a results file can be
checked before `multiserve compare` trusts it (and tests hold the writer to it).
"""

from __future__ import annotations

from typing import Any

from multiserve.bench.metrics import LATENCIES, STATS

_NUM = {"type": "number"}
_COUNT = {"type": "integer", "minimum": 0}
_OPT_NUM = {"type": ["number", "null"]}
_OPT_STR = {"type": ["string", "null"]}
_RATE = {"anyOf": [{"type": "number", "exclusiveMinimum": 0}, {"const": "inf"}, {"type": "null"}]}

_ERROR = {
    "type": ["object", "null"],
    "required": ["kind", "status", "message"],
    "properties": {
        "kind": {"type": "string"},
        "status": {"type": ["integer", "null"]},
        "message": {"type": "string"},
    },
}

_RECORD = {
    "type": "object",
    "required": [
        "index",
        "success",
        "start_ms",
        "ttft_ms",
        "tpot_ms",
        "e2el_ms",
        "itl_ms",
        "output_tokens",
        "output_token_source",
        "input_tokens",
        "input_token_source",
        "refusals",
        "error",
    ],
    "properties": {
        "index": _COUNT,
        "success": {"type": "boolean"},
        "start_ms": _NUM,
        "ttft_ms": _OPT_NUM,
        "tpot_ms": _OPT_NUM,
        "e2el_ms": _NUM,
        "itl_ms": {"type": "array", "items": _NUM},
        "output_tokens": _COUNT,
        "output_token_source": {"enum": ["usage", "chunks"]},
        "input_tokens": _COUNT,
        "input_token_source": {"enum": ["usage", "estimate"]},
        "finish_reason": _OPT_STR,
        "refusals": _COUNT,
        "retry_wait_ms": _NUM,
        "error": _ERROR,
    },
}

SUMMARY_PROPERTIES: dict[str, Any] = {
    "completed": _COUNT,
    "failed": _COUNT,
    "cancelled": _COUNT,
    "duration": {"type": "number", "minimum": 0},
    "total_input_tokens": _COUNT,
    "total_output_tokens": _COUNT,
    "request_throughput": _NUM,
    "request_goodput": _OPT_NUM,
    "good_completed": {"type": ["integer", "null"]},
    "output_throughput": _NUM,
    "total_token_throughput": _NUM,
    **{f"{stat}_{metric}_ms": _OPT_NUM for metric in LATENCIES for stat in STATS},
    "output_token_source": {"enum": ["usage", "chunks", "mixed", None]},
    "output_token_sources": {"type": "object", "additionalProperties": _COUNT},
    "input_token_source": {"enum": ["usage", "estimate", "mixed", None]},
    "errors": {"type": "object", "additionalProperties": _COUNT},
    "error_statuses": {"type": "object", "additionalProperties": _COUNT},
    "refusals": _COUNT,
    "retry_wait_s": _NUM,
}

_POINT = {
    "type": "object",
    "required": [
        "concurrency",
        "rate",
        "burstiness",
        "ended_by",
        "stopped_early",
        "delayed_arrivals",
        "peak_inflight",
        *SUMMARY_PROPERTIES,
        "records",
    ],
    "properties": {
        "concurrency": {"type": ["integer", "null"], "minimum": 1},
        "rate": _RATE,
        "burstiness": {"type": "number", "exclusiveMinimum": 0},
        "started_at": {"type": "string"},
        "ended_by": {"enum": ["requests", "duration", "stopped"]},
        "stopped_early": _OPT_STR,
        "delayed_arrivals": _COUNT,
        "peak_inflight": _COUNT,
        **SUMMARY_PROPERTIES,
        "records": {"type": "array", "items": _RECORD},
    },
}

RESULT_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "multiserve bench results",
    "type": "object",
    "required": [
        "tool",
        "version",
        "schema_version",
        "started_at",
        "finished_at",
        "server",
        "config",
        "precheck",
        "cold_start",
        "warmup",
        "stopped_early",
        "sweep",
        "points",
    ],
    "properties": {
        "tool": {"const": "multiserve bench"},
        "version": {"type": "string"},
        "schema_version": {"const": 1},
        "started_at": {"type": "string"},
        "finished_at": _OPT_STR,
        "server": {
            "type": "object",
            "required": ["url", "model"],
            "properties": {"url": {"type": "string"}, "model": {"type": "string"}},
        },
        "config": {
            "type": "object",
            "required": ["url", "model", "endpoint", "api_key_set", "requests", "duration"],
            "properties": {
                "endpoint": {"enum": ["chat", "completions"]},
                "api_key_set": {"type": "boolean"},
            },
            "not": {"required": ["api_key"]},  # the key itself is never written
        },
        "precheck": {
            "type": ["object", "null"],
            "required": ["ok", "message"],
            "properties": {"ok": {"type": "boolean"}, "message": {"type": "string"}},
        },
        "cold_start": {
            "type": ["object", "null"],
            "required": ["success", "ttft_ms", "e2el_ms", "error"],
            "properties": {
                "success": {"type": "boolean"},
                "ttft_ms": _OPT_NUM,
                "e2el_ms": _NUM,
                "error": _ERROR,
            },
        },
        "warmup": {
            "type": "object",
            "required": ["requests", "completed", "records"],
            "properties": {
                "requests": _COUNT,
                "completed": _COUNT,
                "records": {"type": "array", "items": _RECORD},
            },
        },
        "stopped_early": _OPT_STR,
        "sweep": {
            "type": ["object", "null"],
            "required": ["parameter", "values"],
            "properties": {
                "parameter": {"enum": ["concurrency", "rate"]},
                "values": {"type": "array"},
            },
        },
        "points": {"type": "array", "items": _POINT},
        # A single-point run repeats its summary here, as vLLM's files have it.
        **SUMMARY_PROPERTIES,
        "request_rate": _RATE,
        "max_concurrency": {"type": ["integer", "null"]},
    },
}


def validate(data: Any) -> None:
    """Raise jsonschema.ValidationError when `data` is not a results file (needs jsonschema)."""
    import jsonschema

    jsonschema.Draft202012Validator(RESULT_SCHEMA).validate(data)
