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
    placed_by: str | None = None  # the rule that placed the conversation where it stays

    def explain(self, model_id: str, passed: tuple[tuple[str, str], ...] = ()) -> str:
        """The `x-multiserve-route` header: rule, model, why; models that refused first.

        Printable ASCII only: text quoted from the message is escaped (\\uXXXX), and so are
        the `;` and `=` that separate the parts."""
        parts = [f"rule={self.rule}", f"model={model_id}", f"reason={_escaped(self.reason)}"]
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
        self._by_name = {rule.name: rule for rule in self._rules}
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
        return self._sticky.count() if self._sticky is not None else 0

    def decide(self, request: RouteRequest, fleet: FleetView) -> Decision:
        started = time.perf_counter()
        ruled = self._rule_route(request, fleet)
        decision = self._sticky_route(request, fleet, ruled) or ruled
        return replace(decision, seconds=time.perf_counter() - started)

    def remember(self, request: RouteRequest, decision: Decision, model_id: str) -> None:
        """The request was admitted by `model_id`: the conversation's later turns go there."""
        if self._sticky is not None and request.conversation is not None:
            rule = decision.placed_by or decision.rule
            self._sticky.put(request.conversation, Placement(model_id, rule))

    def _sticky_route(
        self, request: RouteRequest, fleet: FleetView, ruled: Decision
    ) -> Decision | None:
        """A later turn goes to the model its conversation is on, then to the other targets of
        the rule that placed it (with that rule's fallthrough). But a rule about what the
        request needs (tools, JSON, images, size) outranks the conversation: when its targets
        do not include that model, the need wins and the conversation moves."""
        if self._sticky is None or request.conversation is None or not request.later_turn:
            return None
        placement = self._sticky.get(request.conversation)
        if placement is None or not fleet.available(placement.model_id):
            return None
        model = placement.model_id
        matched = self._by_name.get(ruled.rule)
        if matched is not None and matched.rule.states_needs:
            if model not in ruled.targets:
                return None
            others = tuple(t for t in ruled.targets if t != model)
            reason = f"{ruled.reason}; the conversation's model first"
            return replace(ruled, targets=(model, *others), reason=reason, placed_by=placement.rule)
        placing = self._by_name.get(placement.rule)
        others, fallthrough = (), False
        if placing is not None:
            rest = tuple(t for t in self._targets[placing.name] if t != model)
            others = _ordered(rest, fleet, placing.rule.prefer_loaded)
            fallthrough = placing.rule.fallthrough
        reason = f"conversation placed by {placement.rule}"
        return Decision(
            "sticky",
            (model, *others),
            reason,
            fallthrough,
            ruled.language,
            placed_by=placement.rule,
        )

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


def _escaped(text: str) -> str:
    return "".join(
        char
        if " " <= char <= "~" and char not in ";=\\"
        else f"\\u{ord(char):04x}"
        if ord(char) <= 0xFFFF
        else f"\\U{ord(char):08x}"
        for char in text
    )


def _ordered(targets: tuple[str, ...], fleet: FleetView, prefer_loaded: bool) -> tuple[str, ...]:
    """Targets that can serve first; with `prefer_loaded`, loaded ones before cold ones. The
    sort is stable, so the configured order decides among equals."""

    def rank(model_id: str) -> tuple[bool, bool]:
        return (not fleet.available(model_id), prefer_loaded and not fleet.loaded(model_id))

    return tuple(sorted(targets, key=rank))
