"""The HTTP routes: OpenAI completions and models, plus health, stats and metrics."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from multiserve.api.errors import APIError, model_not_found
from multiserve.api.formats import ChatFormat, ResponseFormat, TextFormat
from multiserve.api.generation import generate
from multiserve.api.metrics import Metrics
from multiserve.api.schemas import ChatCompletionRequest, CompletionRequest, _SamplingRequest
from multiserve.config import Settings
from multiserve.engine.client import EngineClient
from multiserve.engine.protocol import Generate, SamplingParams
from multiserve.fleet.manager import Fleet, ModelEntry, ModelUnavailable
from multiserve.templates.chat import ChatTemplateError, resolve_template


@dataclass
class ServerState:
    settings: Settings
    fleet: Fleet
    metrics: Metrics
    started: float


router = APIRouter()


def _state(request: Request) -> ServerState:
    return request.app.state.server


async def _engine_for(
    state: ServerState, body: _SamplingRequest
) -> tuple[ModelEntry, EngineClient]:
    entry = state.fleet.resolve(body.model)
    if entry is None:
        raise model_not_found(body.model)
    if body.n > state.settings.max_n:
        raise APIError(400, f"n must be at most {state.settings.max_n}", param="n")
    try:
        return entry, await state.fleet.engine(entry)
    except ModelUnavailable as exc:
        raise APIError(
            503, str(exc), code="model_unavailable", headers={"Retry-After": "5"}
        ) from None


def _sampling(body: _SamplingRequest, max_tokens: int | None, logprobs: int | None):
    return SamplingParams(
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=body.top_k,
        min_p=body.min_p,
        seed=body.seed,
        presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty,
        repeat_penalty=body.repeat_penalty,
        logit_bias=body.token_logit_bias(),
        json_schema=body.json_schema_text(),
        max_tokens=max_tokens,
        stop=tuple(body.stop or ()),
        ignore_eos=body.ignore_eos,
        logprobs=logprobs,
    )


async def _run(
    state: ServerState,
    entry: ModelEntry,
    engine: EngineClient,
    body: _SamplingRequest,
    request: Generate,
    fmt: ResponseFormat,
):
    tracker = state.metrics.track(entry.spec.id)
    return await generate(
        engine, request, fmt, tracker, stream=body.stream, include_usage=body.include_usage
    )


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request):
    state = _state(request)
    entry, engine = await _engine_for(state, body)
    info = engine.info
    template = resolve_template(
        info.chat_template,
        info.architecture,
        info.name,
        info.bos_token,
        info.eos_token,
        entry.spec.chat_template,
    )
    messages = [{"role": m.role, "content": m.text()} for m in body.messages]
    try:
        prompt = template.render(messages, add_generation_prompt=True)
    except ChatTemplateError as exc:
        raise APIError(400, str(exc), param="messages") from None
    starts_with_bos = bool(info.bos_token) and prompt.startswith(info.bos_token)
    generate_request = Generate(
        request_id=uuid.uuid4().hex,
        prompt=prompt,
        n=body.n,
        params=_sampling(body, body.token_limit, body.logprobs_count),
        add_bos=not starts_with_bos,
        parse_special=True,
    )
    fmt = ChatFormat(body.model, want_logprobs=body.logprobs)
    return await _run(state, entry, engine, body, generate_request, fmt)


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request):
    state = _state(request)
    entry, engine = await _engine_for(state, body)
    prompt = body.prompt if isinstance(body.prompt, str) else tuple(body.prompt)
    generate_request = Generate(
        request_id=uuid.uuid4().hex,
        prompt=prompt,
        n=body.n,
        params=_sampling(body, body.token_limit, body.logprobs_count),
        add_bos=True,
        parse_special=True,
    )
    fmt = TextFormat(body.model, want_logprobs=body.logprobs is not None)
    return await _run(state, entry, engine, body, generate_request, fmt)


def _model_card(model_id: str, entry: ModelEntry) -> dict:
    return {
        "id": model_id,
        "object": "model",
        "created": entry.created,
        "owned_by": "multiserve",
        "state": entry.state.value,
        "aliases": list(entry.spec.aliases),
    }


@router.get("/v1/models")
async def list_models(request: Request) -> dict:
    fleet = _state(request).fleet
    return {
        "object": "list",
        "data": [_model_card(model_id, e) for model_id, e in fleet.entries.items()],
    }


@router.get("/v1/models/{model_id:path}")
async def get_model(model_id: str, request: Request) -> dict:
    entry = _state(request).fleet.resolve(model_id)
    if entry is None:
        raise model_not_found(model_id)
    return _model_card(entry.spec.id, entry)


@router.get("/health")
async def health(request: Request) -> JSONResponse:
    fleet = _state(request).fleet
    states = {model_id: e.state.value for model_id, e in fleet.entries.items()}
    return JSONResponse({"status": "ok", "models": states})


@router.get("/stats")
async def stats(request: Request) -> dict:
    state = _state(request)
    return {"uptime_seconds": round(time.time() - state.started, 3), **state.metrics.snapshot()}


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    return Response(_state(request).metrics.prometheus(), media_type=CONTENT_TYPE_LATEST)
