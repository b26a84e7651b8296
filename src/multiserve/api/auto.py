"""`"model": "auto"` at the API: what the router sees of a request, and what it sees of the fleet.

The router itself (multiserve.router) knows neither HTTP nor workers; this is the seam.
"""

from __future__ import annotations

import json

from multiserve.api.schemas import ChatCompletionRequest, CompletionRequest
from multiserve.config import Settings
from multiserve.fleet.manager import Fleet
from multiserve.router.config import AUTO_MODEL
from multiserve.router.decision import Router
from multiserve.router.language import detect_language, warm_up
from multiserve.router.request import TEXT_LIMIT, RouteRequest, estimate_tokens
from multiserve.router.sticky import conversation_key

ROUTE_HEADER = "x-multiserve-route"
_PER_MESSAGE = 4  # tokens a template adds around each message, roughly


def build_router(settings: Settings) -> Router | None:
    """The server's router, its language model loaded (so no request pays for that)."""
    if settings.router is None:
        return None
    warm_up()
    return Router(settings.router, settings.model_id, detect_language)


def wants_routing(model: str, router: Router | None) -> bool:
    return router is not None and model == AUTO_MODEL


def chat_route(body: ChatCompletionRequest, client: str) -> RouteRequest:
    """The last user message, the whole prompt's size, the request's needs, the conversation
    (as `client`'s: see rate_limit.client_identity)."""
    messages = body.messages
    users = [m for m in messages if m.role == "user"]
    system = [m.text() for m in messages if m.role in ("system", "developer")]
    tokens = sum(estimate_tokens(m.text()) + _PER_MESSAGE for m in messages)
    if body.tools:
        tokens += estimate_tokens(json.dumps([t.model_dump(exclude_none=True) for t in body.tools]))
    return RouteRequest(
        text=users[-1].text()[:TEXT_LIMIT] if users else "",
        token_estimate=tokens,
        tools=bool(body.callable_tools()),
        json_schema=body.json_schema_text() is not None,
        images=any(m.has_images for m in messages),
        conversation=conversation_key(client, system, users[0].text()) if users else None,
        later_turn=any(m.role == "assistant" for m in messages),
    )


def completion_route(body: CompletionRequest) -> RouteRequest:
    """A prompt is its own message; a token-array prompt has no text to read (its length is
    known exactly). Completions carry no conversation to keep together."""
    text = next((p for p in body.prompts if isinstance(p, str)), "")
    tokens = max(
        (estimate_tokens(p) if isinstance(p, str) else len(p) for p in body.prompts), default=0
    )
    return RouteRequest(
        text=text[:TEXT_LIMIT],
        token_estimate=tokens,
        json_schema=body.json_schema_text() is not None,
    )


class FleetView:
    """The router's view of the fleet: which models are loaded, which can serve at all."""

    def __init__(self, fleet: Fleet) -> None:
        self._fleet = fleet

    def loaded(self, model_id: str) -> bool:
        return self._fleet.ready(self._fleet.entries[model_id]) is not None

    def available(self, model_id: str) -> bool:
        return self._fleet.can_serve(self._fleet.entries[model_id])
