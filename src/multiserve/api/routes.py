"""The HTTP routes: OpenAI completions and models, model load/unload, health, stats, metrics."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from multiserve.api.auto import (
    ROUTE_HEADER,
    FleetView,
    chat_route,
    completion_route,
    wants_routing,
)
from multiserve.api.embeddings import EmbeddingFailed, embed, embedding_body, open_embedding
from multiserve.api.errors import APIError, model_not_found
from multiserve.api.formats import ChatFormat, TextFormat, WireFormat
from multiserve.api.generation import (
    CLIENT_CLOSED_REQUEST,
    ClientDisconnected,
    generate,
    shutting_down,
    unless_disconnected,
)
from multiserve.api.metrics import Metrics, replicas
from multiserve.api.openapi import EVENT_STREAM, error_responses
from multiserve.api.rate_limit import RateLimiter, client_identity, retry_after_header
from multiserve.api.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    SamplingRequest,
)
from multiserve.api.security import API_KEY_SCOPE
from multiserve.backends.client import RequestCut, RunningModel
from multiserve.config import Settings
from multiserve.engine.protocol import (
    Embed,
    Generate,
    SamplingParams,
    TextPrompt,
    TokenPrompt,
    ToolConstraint,
)
from multiserve.fleet.admission import Overloaded, Ticket
from multiserve.fleet.manager import (
    Fleet,
    ModelBusy,
    ModelEntry,
    ModelTooLarge,
    ModelUnavailable,
)
from multiserve.router.config import AUTO_MODEL
from multiserve.router.decision import Decision, Router
from multiserve.router.request import RouteRequest
from multiserve.templates.chat import ChatTemplateError, resolve_template
from multiserve.tools.layouts import detect_layout, native_tools
from multiserve.tools.prompting import template_messages


@dataclass(frozen=True)
class Built:
    """A request made ready for the worker: its prompts, and how to read the answer."""

    prompts: list[TextPrompt | TokenPrompt]
    add_bos: bool
    fmt: WireFormat
    tools: ToolConstraint | None = None


@dataclass
class ServerState:
    settings: Settings
    fleet: Fleet
    metrics: Metrics
    started: float
    rate_limiter: RateLimiter | None = None
    router: Router | None = None
    draining: bool = False


router = APIRouter()
_HEALTH = {
    503: {
        "description": "Draining for shutdown, or no model can serve: send traffic elsewhere.",
        "content": {"application/json": {}},
    }
}


def _state(request: Request) -> ServerState:
    return request.app.state.server


def _entry(state: ServerState, name: str) -> ModelEntry:
    entry = state.fleet.resolve(name)
    if entry is None:
        raise model_not_found(name)
    return entry


def _unavailable(exc: ModelUnavailable | ModelTooLarge) -> APIError:
    if isinstance(exc, ModelTooLarge) and exc.retry_after is None:
        # a 4xx: clients retry 5xx, and that cannot help here
        return APIError(400, str(exc), param="model", code="model_too_large")
    if isinstance(exc, ModelTooLarge):  # until a big enough node joins the cluster
        return APIError(
            503, str(exc), code="model_too_large", headers={"Retry-After": str(exc.retry_after)}
        )
    return APIError(
        503, str(exc), code="model_unavailable", headers={"Retry-After": str(exc.retry_after)}
    )


def _client(request: Request) -> str:
    """Who sent the request: its API key, else its address (see client_identity)."""
    address = request.client.host if request.client else None
    return client_identity(request.scope.get(API_KEY_SCOPE), address)


def _check_rate(state: ServerState, request: Request, model_id: str) -> None:
    if state.rate_limiter is None:
        return
    wait = state.rate_limiter.wait_needed(_client(request))
    if wait > 0:
        state.metrics.refused(model_id, "rate_limited")
        raise APIError(
            429,
            "Rate limit reached for your key; retry after the Retry-After seconds.",
            code="rate_limit_exceeded",
            headers={"Retry-After": retry_after_header(wait)},
        )


@dataclass(frozen=True)
class Routed:
    """How an `auto` request reached its model: the header that says so, and what the router
    remembers of the conversation once the model has accepted the request."""

    header: str
    request: RouteRequest
    decision: Decision


@dataclass(frozen=True)
class Admitted:
    """A request's model and its places in that model's queue; with `auto`, how it got there."""

    entry: ModelEntry
    ticket: Ticket
    routed: Routed | None = None

    @property
    def route(self) -> str | None:
        """The x-multiserve-route header, for a routed request."""
        return self.routed.header if self.routed is not None else None

    def answering_name(self, requested: str) -> str:
        """The `model` a response names: the name asked for, or the expert that `auto` chose."""
        return self.entry.spec.id if self.routed is not None else requested


def _admitted(
    state: ServerState,
    request: Request,
    body: SamplingRequest,
    prompts: int,
    route: Callable[[], RouteRequest],
) -> Admitted:
    """The model and a place in its queue for each prompt, or the refusal. `route` (called only
    for `auto`) says what the router sees of the request."""
    if state.draining:
        raise shutting_down()
    if wants_routing(body.model, state.router):
        return _routed(state, request, body, prompts, route())
    entry = _entry(state, body.model)
    _check_fits(state, entry, body, prompts)
    return Admitted(entry, _ticket(state, request, entry, prompts))


def _routed(
    state: ServerState, request: Request, body: SamplingRequest, prompts: int, route: RouteRequest
) -> Admitted:
    """Admission along the router's targets: the first that takes the request, passing a
    refusing one to the next only where the rule allows it."""
    assert state.router is not None
    decision = state.router.decide(route, FleetView(state.fleet))
    passed: list[tuple[str, str]] = []
    for place, model_id in enumerate(decision.targets, start=1):
        entry = state.fleet.entries[model_id]
        try:
            _check_fits(state, entry, body, prompts)
            if place == 1:  # once, after the 400s, as for a request naming its model
                _check_rate(state, request, model_id)
            ticket = _place(state, entry, prompts)
        except APIError as refusal:
            _with_route(refusal, decision.explain(model_id, tuple(passed)))
            if refusal.status != 503 or not decision.fallthrough or place == len(decision.targets):
                raise
            passed.append((model_id, refusal.code or "refused"))
            continue
        state.metrics.routed(decision.rule, model_id, decision.seconds, len(passed))
        routed = Routed(decision.explain(model_id, tuple(passed)), route, decision)
        return Admitted(entry, ticket, routed)
    raise AssertionError("a rule has at least one target")  # the loop returns or raises


def _check_fits(state: ServerState, entry: ModelEntry, body: SamplingRequest, prompts: int) -> None:
    """400s for what this model cannot do with this request, whatever its load (so before a
    place in its queue, and before a load)."""
    if body.has_images:  # no model served reads images yet
        raise APIError(
            400,
            f"model `{entry.spec.id}` does not read images: send text only, or route images "
            "to a model that does",
            param="messages",
            code="images_not_supported",
        )
    if entry.spec.embedding:
        raise APIError(
            400,
            f"model `{entry.spec.id}` is an embedding model: it answers only /v1/embeddings",
            param="model",
            code="wrong_model_type",
        )
    limit = min(state.settings.max_n, entry.spec.n_parallel)
    if body.n > limit:
        raise APIError(
            400,
            f"n must be at most {limit} for model `{entry.spec.id}`",
            param="n",
            code="n_too_large",
        )
    if prompts > entry.admission.capacity:
        raise APIError(
            400,
            f"at most {entry.admission.capacity} prompts per request for model `{entry.spec.id}`",
            param="prompt",
            code="too_many_prompts",
        )


def _ticket(state: ServerState, request: Request, entry: ModelEntry, places: int) -> Ticket:
    """A place in the model's queue for each of `places` prompts, or the refusal."""
    _check_rate(state, request, entry.spec.id)
    return _place(state, entry, places)


def _place(state: ServerState, entry: ModelEntry, places: int) -> Ticket:
    try:
        return state.fleet.admit(entry, places)
    except Overloaded as exc:
        state.metrics.refused(entry.spec.id, "queue_full")
        raise APIError(
            503,
            f"Model `{entry.spec.id}` is overloaded; retry later.",
            code="queue_full",
            headers={"Retry-After": str(exc.retry_after)},
        ) from None
    except ModelUnavailable as exc:
        state.metrics.refused(entry.spec.id, "model_unavailable")
        raise _unavailable(exc) from None


async def _engine(
    state: ServerState, request: Request, entry: ModelEntry, ticket: Ticket, deadline: float
) -> RunningModel:
    """The model's worker; waiting for a load or for room counts against the request's queue
    timeout, and a client gone meanwhile stops waiting (a load nobody waits for stops too).

    A worker got after a wait is handed back only if it is still the model's: one that was
    giving way is stopped as soon as no request is on it, which can happen after the wait
    ended and before this task ran again. The caller opens its request on the worker before
    awaiting anything, so once handed back it cannot be stopped under the request."""
    if (client := state.fleet.ready(entry)) is not None:
        return client  # the common case: no timer task per request
    try:
        while True:
            waiting = unless_disconnected(request, state.fleet.engine(entry))
            client = await asyncio.wait_for(waiting, deadline - time.monotonic())
            if entry.client is client:
                return client
    except (ModelUnavailable, ModelTooLarge) as exc:
        raise _unavailable(exc) from None
    except RequestCut:
        raise shutting_down() from None
    except TimeoutError:
        raise APIError(
            503,
            f"Model `{entry.spec.id}` is still loading; retry later.",
            code="queue_timeout",
            headers={"Retry-After": str(ticket.retry_after())},
        ) from None


def _sampling(
    entry: ModelEntry,
    body: SamplingRequest,
    max_tokens: int | None,
    logprobs: int | None,
    tools: ToolConstraint | None,
) -> SamplingParams:
    """The request's sampling fields, with the model's configured defaults where it is silent."""
    given = body.model_fields_set
    defaults = entry.spec.defaults.given()
    fields = {
        name: defaults[name] if name in defaults and name not in given else getattr(body, name)
        for name in ("temperature", "top_p", "top_k", "min_p", "repeat_penalty")
    }
    if not {"max_tokens", "max_completion_tokens"} & given:
        max_tokens = defaults.get("max_tokens", max_tokens)
    return SamplingParams(
        **fields,
        seed=body.seed,
        presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty,
        logit_bias=body.token_logit_bias(),
        json_schema=body.json_schema_text(),
        tools=tools,
        max_tokens=max_tokens,
        stop=tuple(body.stop or ()),
        ignore_eos=body.ignore_eos,
        logprobs=logprobs,
    )


async def _complete(
    request: Request, body: SamplingRequest, prompts: int, build, route
) -> Response:
    """Admit (routing `auto`), get the worker, build the engine requests (one per prompt) and
    format, answer."""
    state = _state(request)
    arrived = time.monotonic()
    admitted = _admitted(state, request, body, prompts, route)
    entry, ticket = admitted.entry, admitted.ticket
    tracker = state.metrics.track(entry.spec.id)  # latencies count from arrival, loads included
    try:
        deadline = arrived + entry.spec.queue_timeout
        engine = await _engine(state, request, entry, ticket, deadline)
        built: Built = build(entry, engine, admitted.answering_name(body.model))
        params = _sampling(entry, body, body.token_limit, body.logprobs_count, built.tools)
        generate_requests = [
            Generate(
                request_id=uuid.uuid4().hex,
                prompt=prompt,
                n=body.n,
                params=params,
                add_bos=built.add_bos,
                queue_timeout=deadline - time.monotonic(),
                cache_prompt=body.cache_prompt,
            )
            for prompt in built.prompts
        ]
    except APIError as exc:
        ticket.release()
        tracker.failed(exc.code or "invalid_request")
        raise _with_route(exc, admitted.route) from None
    except ClientDisconnected:
        ticket.release()
        tracker.failed("client_disconnected")
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    except BaseException:
        ticket.release()
        tracker.failed("client_disconnected")
        raise
    try:
        response = await generate(
            request,
            engine,
            generate_requests,
            built.fmt,
            tracker,
            ticket,
            stream=body.stream,
            include_usage=body.include_usage,
        )
    except APIError as exc:
        raise _with_route(exc, admitted.route) from None
    if admitted.routed is not None:  # accepted: the conversation's later turns come here too
        response.headers[ROUTE_HEADER] = admitted.routed.header
        assert state.router is not None
        state.router.remember(admitted.routed.request, admitted.routed.decision, entry.spec.id)
    return response


def _with_route(error: APIError, route: str | None) -> APIError:
    """A routed request's error says where the router sent it, as its answer would."""
    if route is not None:
        error.headers = {**(error.headers or {}), ROUTE_HEADER: route}
    return error


@router.post(
    "/v1/chat/completions", responses=EVENT_STREAM | error_responses(400, 404, 429, 500, 503)
)
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
    if (problem := body.tools_problem()) is not None:
        message, param, code = problem
        raise APIError(400, message, param=param, code=code)

    def build(entry: ModelEntry, engine: RunningModel, name: str) -> Built:
        info = engine.info
        template = resolve_template(
            info.chat_template,
            info.architecture,
            info.name,
            info.bos_token,
            info.eos_token,
            entry.spec.chat_template,
        )
        messages = [m.as_template_input() for m in body.messages]
        tools = body.callable_tools()
        listed = [tool.model_dump(exclude_none=True) for tool in tools]
        layout = constraint = None
        if tools or any(m.tool_calls or m.role == "tool" for m in body.messages):
            layout = detect_layout(template.source, info.single_tokens)
            native = native_tools(template.source, layout)
            messages = template_messages(messages, layout, native, None if native else listed)
            listed = listed if native else []
        if tools:
            schemas = tuple(
                (t.function.name, json.dumps(t.function.parameters_schema())) for t in tools
            )
            constraint = ToolConstraint(
                layout, schemas, body.call_required, body.parallel_tool_calls
            )
        try:
            segments = template.render_segments(messages, True, listed or None)
        except ChatTemplateError as exc:
            raise APIError(400, str(exc), param="messages") from None
        first = segments[0] if segments else None
        starts_with_bos = bool(
            first and first.special and info.bos_token and first.text.startswith(info.bos_token)
        )
        fmt = ChatFormat(name, body.logprobs, layout if tools else None)
        return Built([TextPrompt(tuple(segments))], not starts_with_bos, fmt, constraint)

    return await _complete(request, body, 1, build, lambda: chat_route(body, _client(request)))


@router.post("/v1/completions", responses=EVENT_STREAM | error_responses(400, 404, 429, 500, 503))
async def completions(body: CompletionRequest, request: Request) -> Response:
    prompts = [
        TextPrompt.completion(p) if isinstance(p, str) else TokenPrompt(p) for p in body.prompts
    ]

    def build(entry: ModelEntry, engine: RunningModel, name: str) -> Built:
        return Built(prompts, True, TextFormat(name, want_logprobs=body.logprobs is not None))

    return await _complete(request, body, len(prompts), build, lambda: completion_route(body))


def _model_card(entry: ModelEntry) -> dict:
    return {
        "id": entry.spec.id,
        "object": "model",
        "created": entry.created,
        "owned_by": "multiserve",
        "state": entry.state.value,
        "aliases": list(entry.spec.aliases),
        "replicas": [{"node": view["node"], "state": view["state"]} for view in replicas(entry)],
    }


def _router_card(state: ServerState) -> dict:
    """`auto` as a model: what the router may send a request to."""
    assert state.router is not None
    return {
        "id": AUTO_MODEL,
        "object": "model",
        "created": int(state.started),
        "owned_by": "multiserve",
        "state": "router",
        "aliases": [],
        "routes_to": state.router.model_ids,
    }


@router.get("/v1/models")
async def list_models(request: Request) -> dict:
    state = _state(request)
    cards = [_model_card(e) for e in state.fleet.entries.values()]
    if state.router is not None:
        cards.append(_router_card(state))
    return {"object": "list", "data": cards}


def _not_the_router(state: ServerState, name: str) -> None:
    if wants_routing(name, state.router):
        assert state.router is not None
        raise APIError(
            400,
            f"`{AUTO_MODEL}` is the router, not a model: name one of "
            f"{', '.join(state.router.model_ids)}",
            param="model",
            code="not_a_model",
        )


@router.post("/v1/models/{model_id:path}/load", responses=error_responses(400, 404, 405, 503))
async def load_model(model_id: str, request: Request) -> dict:
    state = _state(request)
    _not_the_router(state, model_id)
    entry = _entry(state, model_id)
    try:
        await state.fleet.engine(entry)
    except (ModelUnavailable, ModelTooLarge) as exc:
        raise _unavailable(exc) from None
    except RequestCut:
        raise shutting_down() from None
    return _model_card(entry)


@router.post("/v1/models/{model_id:path}/unload", responses=error_responses(400, 404, 405, 409))
async def unload_model(model_id: str, request: Request, wait: bool = False) -> dict:
    state = _state(request)
    _not_the_router(state, model_id)
    entry = _entry(state, model_id)
    try:
        await state.fleet.unload(entry, wait=wait)
    except ModelBusy as exc:
        raise APIError(409, f"{exc}; retry later or pass ?wait=true", code="model_busy") from None
    return _model_card(entry)


@router.get("/v1/models/{model_id:path}", responses=error_responses(404))
async def get_model(model_id: str, request: Request) -> dict:
    state = _state(request)
    if wants_routing(model_id, state.router):
        return _router_card(state)
    return _model_card(_entry(state, model_id))


# Model ids may contain '/', so `GET /v1/models/x/unload` would otherwise read as the card of a
# model "x/unload". Registered ahead of `router`: it answers 405, Allow: POST, to every method but
# POST.
misdirected = APIRouter()


_NOT_POST = ["GET", "HEAD", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE"]


@misdirected.api_route(
    "/v1/models/{model_id:path}/load", methods=_NOT_POST, include_in_schema=False
)
@misdirected.api_route(
    "/v1/models/{model_id:path}/unload", methods=_NOT_POST, include_in_schema=False
)
async def model_action_without_post(model_id: str, request: Request) -> dict:
    action = request.scope["path"].rsplit("/", 1)[1]
    entry = _state(request).fleet.resolve(f"{model_id}/{action}")
    if entry is None:
        raise APIError(405, f"Use POST to {action} a model.", headers={"Allow": "POST"})
    if request.method != "GET":  # a model really named ".../load": its card is GET only
        raise APIError(405, "Method Not Allowed", headers={"Allow": "GET"})
    return _model_card(entry)


@router.get("/health", responses=_HEALTH)
async def health(request: Request) -> JSONResponse:
    """`ok`; `degraded` (200) when some models failed, 503 when none can serve; `draining`."""
    state = _state(request)
    fleet = state.fleet
    models = {i: e.state.value for i, e in fleet.entries.items()}
    if state.draining:
        return JSONResponse({"status": "draining", "models": models}, status_code=503)
    failed = fleet.failed()
    if not failed:
        return JSONResponse({"status": "ok", "models": models})
    status = 503 if len(failed) == len(fleet.entries) else 200
    return JSONResponse(
        {"status": "degraded", "models": models, "failed": failed}, status_code=status
    )


@router.get("/stats")
async def stats(request: Request) -> dict:
    state = _state(request)
    fleet = state.fleet
    body = {
        "uptime_seconds": round(time.time() - state.started, 3),
        "memory": fleet.memory(),
        **state.metrics.snapshot(),
    }
    if state.router is not None:
        body["router"] = state.metrics.router_snapshot(state.router.conversations)
    return body


@router.get("/metrics", response_class=PlainTextResponse)
async def metrics(request: Request) -> Response:
    return Response(_state(request).metrics.prometheus(), media_type=CONTENT_TYPE_LATEST)


def _embedding_entry(state: ServerState, name: str) -> ModelEntry:
    """The embedding model answering for `name`: itself, or its `embeddings_model`."""
    _not_the_router(state, name)
    entry = _entry(state, name)
    if entry.spec.embedding:
        return entry
    if entry.spec.embeddings_model is not None:
        return state.fleet.entries[entry.spec.embeddings_model]
    raise APIError(
        400,
        f"model `{entry.spec.id}` does not make embeddings: ask a model served with "
        "`embedding = true` (for retrieval, a dedicated embedding GGUF such as nomic-embed or bge)",
        param="model",
        code="wrong_model_type",
    )


@router.post("/v1/embeddings", responses=error_responses(400, 404, 429, 500, 503))
async def embeddings(body: EmbeddingRequest, request: Request) -> Response:
    """Every input's vector, in one batched run on the embedding model's worker."""
    state = _state(request)
    arrived = time.monotonic()
    if state.draining:
        raise shutting_down()
    entry = _embedding_entry(state, body.model)
    ticket = _ticket(state, request, entry, 1)
    tracker = state.metrics.track(entry.spec.id)
    deadline = arrived + entry.spec.queue_timeout
    try:
        engine = await _engine(state, request, entry, ticket, deadline)
        stream = open_embedding(
            engine,
            Embed(uuid.uuid4().hex, body.inputs, body.dimensions, deadline - time.monotonic()),
        )
        try:
            embedded = await unless_disconnected(request, embed(stream, ticket))
        finally:
            stream.close()  # however the wait ended, even before `embed` ever ran
    except EmbeddingFailed as failure:
        tracker.failed(failure.kind)
        raise failure.error from None
    except APIError as exc:
        tracker.failed(exc.code or "invalid_request")
        raise
    except ClientDisconnected:
        tracker.failed("client_disconnected")
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    except asyncio.CancelledError:
        tracker.failed("client_disconnected")
        raise
    finally:
        ticket.release()
    tracker.embedded(len(embedded.vectors), embedded.prompt_tokens)
    return JSONResponse(embedding_body(embedded, body.model, body.encoding_format))
