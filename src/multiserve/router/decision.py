"""The router: a request's route (a rule, the experts to try in order, and why) in about a
tenth of a millisecond, with conversations kept on the expert that answered their first turn."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Protocol

from multiserve.router.config import RouterConfig
from multiserve.router.request import RouteRequest
from multiserve.router.rules import CompiledRule
from multiserve.router.sticky import Placement, StickyMap

Detector = Callable[[str], "str | None"]


class FleetView(Protocol):
    """What the router may know of the models: is one loaded, can it take requests at all."""

    def loaded(self, model_id: str) -> bool: ...

    def available(self, model_id: str) -> bool: ...


class ColdFleet:
    """Every model can serve and none is loaded: the view without a server (`multiserve route`)."""

    def loaded(self, model_id: str) -> bool:
        return False

    def available(self, model_id: str) -> bool:
        return True


@dataclass(frozen=True)
class Decision:
    rule: str  # the rule's name, "sticky" or "default"
    targets: tuple[str, ...]  # model ids, in the order to try them
    reason: str
    fallthrough: bool = False  # a refusing target passes the request to the next
    language: str | None = None  # detected, when a rule needed it
    seconds: float = 0.0  # time taken to decide
    first_rule: str | None = None  # a sticky route's: the rule that placed the conversation

    def explain(self, model_id: str, passed: tuple[tuple[str, str], ...] = ()) -> str:
        """The `x-multiserve-route` header: rule, model, why; models that refused first.

        ASCII only (a header is Latin-1), so text quoted from the message is escaped."""
        parts = [f"rule={self.rule}", f"model={model_id}", f"reason={self.reason}"]
        if self.language is not None:
            parts.append(f"language={self.language}")
        parts += [f"passed={model}:{code}" for model, code in passed]
        return "; ".join(parts).encode("ascii", "backslashreplace").decode("ascii")


class Router:
    """Decides routes for one server; `remember` is told where a request was admitted."""

    def __init__(
        self,
        config: RouterConfig,
        model_id: Callable[[str], str],
        detect: Detector,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self._rules = [CompiledRule(rule) for rule in config.rules]
        self._targets = {r.name: tuple(model_id(t) for t in r.rule.targets) for r in self._rules}
        self._default = model_id(config.default)
        self._detect = detect
        self._sticky = (
            StickyMap(config.sticky_max, config.sticky_ttl, clock) if config.sticky else None
        )

    @property
    def model_ids(self) -> list[str]:
        """Every model a route may name, each once, in the order the rules name them."""
        named = [m for targets in self._targets.values() for m in targets] + [self._default]
        return list(dict.fromkeys(named))

    @property
    def conversations(self) -> int:
        """Conversations remembered for stickiness now."""
        return len(self._sticky) if self._sticky is not None else 0

    def decide(self, request: RouteRequest, fleet: FleetView) -> Decision:
        started = time.perf_counter()
        decision = self._sticky_route(request, fleet) or self._rule_route(request, fleet)
        return replace(decision, seconds=time.perf_counter() - started)

    def remember(self, request: RouteRequest, decision: Decision, model_id: str) -> None:
        """The request was admitted by `model_id`: the conversation's later turns go there."""
        if self._sticky is not None and request.conversation is not None:
            rule = decision.first_rule or decision.rule
            self._sticky.put(request.conversation, Placement(model_id, rule))

    def _sticky_route(self, request: RouteRequest, fleet: FleetView) -> Decision | None:
        if self._sticky is None or request.conversation is None:
            return None
        placement = self._sticky.get(request.conversation)
        if placement is None or not fleet.available(placement.model_id):
            return None
        reason = f"conversation first routed by {placement.rule}"
        return Decision("sticky", (placement.model_id,), reason, first_rule=placement.rule)

    def _rule_route(self, request: RouteRequest, fleet: FleetView) -> Decision:
        detected: list[str | None] = []

        def language() -> str | None:
            if not detected:
                detected.append(self._detect(request.text))
            return detected[0]

        for rule in self._rules:
            reason = rule.match(request, language)
            if reason is None:
                continue
            targets = _ordered(self._targets[rule.name], fleet, rule.rule.prefer_loaded)
            language_seen = detected[0] if detected else None
            return Decision(rule.name, targets, reason, rule.rule.fallthrough, language_seen)
        language_seen = detected[0] if detected else None
        return Decision("default", (self._default,), "no rule matched", language=language_seen)


def _ordered(targets: tuple[str, ...], fleet: FleetView, prefer_loaded: bool) -> tuple[str, ...]:
    """Targets that can serve first; with `prefer_loaded`, loaded ones before cold ones. The
    sort is stable, so the configured order decides among equals."""

    def rank(model_id: str) -> tuple[bool, bool]:
        return (not fleet.available(model_id), prefer_loaded and not fleet.loaded(model_id))

    return tuple(sorted(targets, key=rank))
