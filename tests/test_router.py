"""The router's rules, one condition at a time, its target order, stickiness and its config
checks; no server and no language model (a fake detector says what the text is in)."""

from __future__ import annotations

from pathlib import Path

import pytest

from multiserve.config import ConfigError, Settings, load_settings
from multiserve.router.config import RouterConfig
from multiserve.router.decision import ColdFleet, Decision, Router
from multiserve.router.keywords import KeywordMatcher, words_of
from multiserve.router.request import RouteRequest, estimate_tokens
from multiserve.router.sticky import Placement, StickyMap, conversation_key

MODELS = ("qwen", "phi4", "mistral", "gemma3", "aya")


class Fleet:
    """A fleet view with chosen models loaded or unable to serve."""

    def __init__(self, loaded: tuple[str, ...] = (), unavailable: tuple[str, ...] = ()) -> None:
        self._loaded, self._unavailable = loaded, unavailable

    def loaded(self, model_id: str) -> bool:
        return model_id in self._loaded

    def available(self, model_id: str) -> bool:
        return model_id not in self._unavailable


class Detector:
    """Says every text is in `language`, and counts how often it was asked."""

    def __init__(self, language: str | None = "en") -> None:
        self.language = language
        self.calls = 0

    def __call__(self, text: str) -> str | None:
        self.calls += 1
        return self.language


def make_router(
    *rules: dict, detector: Detector | None = None, clock=None, **router: object
) -> Router:
    config = RouterConfig.model_validate({"default": "gemma3", "rules": list(rules), **router})
    if clock is not None:
        return Router(config, lambda name: name, detector or Detector(), clock)
    return Router(config, lambda name: name, detector or Detector())


def route(router: Router, text: str = "hello there", fleet=None, **features: object) -> Decision:
    return router.decide(RouteRequest(text=text, **features), fleet or ColdFleet())


# -- conditions ---------------------------------------------------------------------------


def test_no_rule_matching_goes_to_the_default() -> None:
    decision = route(make_router({"name": "code", "keywords": ["python"], "model": "qwen"}))
    assert (decision.rule, decision.targets) == ("default", ("gemma3",))


def test_the_first_matching_rule_wins() -> None:
    router = make_router(
        {"name": "code", "keywords": ["python"], "model": "qwen"},
        {"name": "maths", "keywords": ["integral"], "model": "phi4"},
    )
    assert route(router, "an integral in python").rule == "code"
    assert route(router, "an integral by hand").rule == "maths"


def test_languages_and_not_languages() -> None:
    spanish = make_router(
        {"name": "multi", "languages": ["es", "fr"], "model": "aya"},
        detector=Detector("es"),
    )
    assert route(spanish).targets == ("aya",)
    assert route(spanish).language == "es"
    german = make_router({"name": "multi", "languages": ["es", "fr"], "model": "aya"})
    assert route(german).rule == "default"
    not_english = make_router(
        {"name": "foreign", "not_languages": ["en"], "model": "aya"}, detector=Detector("sw")
    )
    assert route(not_english).rule == "foreign"
    english = make_router({"name": "foreign", "not_languages": ["en"], "model": "aya"})
    assert route(english).rule == "default"


def test_an_undetectable_language_matches_neither_listed_nor_excluded() -> None:
    for condition in ({"languages": ["es"]}, {"not_languages": ["en"]}):
        router = make_router({"model": "aya", **condition}, detector=Detector(None))
        assert route(router, "ok").rule == "default"


def test_the_language_is_detected_once_and_only_when_a_rule_reached_needs_it() -> None:
    detector = Detector("fr")
    router = make_router(
        {"name": "code", "keywords": ["python"], "model": "qwen"},
        {"name": "multi", "languages": ["fr"], "model": "aya"},
        {"name": "other", "not_languages": ["fr"], "model": "mistral"},
        detector=detector,
    )
    assert route(router, "du python").rule == "code"
    assert detector.calls == 0
    assert route(router, "bonjour à tous").rule == "multi"
    assert detector.calls == 1
    detector.language = "de"
    assert route(router, "guten Tag").rule == "other"
    assert detector.calls == 2  # two rules asked, one detection


def test_keywords_are_whole_words_in_any_case_with_stems_phrases_and_unspaced_scripts() -> None:
    keywords = KeywordMatcher(
        ("api", "equation*", "方程", "코드", "c++", "unit test*", "stack trace", "json", "sql")
    )

    def found(text: str) -> str | None:
        return keywords.find(text, words_of(text))

    assert found("call the API twice") == "api"
    assert found("the capital of France") is None  # not inside a word
    assert found("two Equations here") == "equations"
    assert found("an inequation") is None  # a stem still starts a word
    assert found("解方程组") == "方程"  # Chinese has no spaces between words
    assert found("이 코드가 왜") == "코드"  # nor Korean between a word and its particle
    assert found("SQLで2つのテーブル") == "sql"  # a Latin word inside Japanese text
    assert found("I write C++ daily") == "c++"
    assert found("my unit tests fail") == "unit test*"
    assert found("a unit of tests") is None  # a phrase's words in their order
    assert found("print the stack  trace") == "stack trace"
    assert found("edit package.json now") == "json"  # a dotted name's parts
    assert not KeywordMatcher(())


def test_patterns_and_keywords_either_match_and_say_which() -> None:
    router = make_router(
        {"name": "code", "keywords": ["python"], "patterns": [r"\w+\(\)"], "model": "qwen"}
    )
    assert route(router, "why does main() hang").reason == "pattern 1 'main()'"
    assert route(router, "Python or Go?").reason == "keyword 'python'"
    assert route(router, "why does it hang").rule == "default"


def test_tools_json_and_images_conditions() -> None:
    router = make_router(
        {"name": "tools", "tools": True, "model": "mistral"},
        {"name": "json", "json_schema": True, "model": "qwen"},
        {"name": "images", "images": True, "model": "gemma3"},
        {"name": "plain", "tools": False, "images": False, "model": "phi4"},
    )
    assert route(router, tools=True).rule == "tools"
    assert route(router, json_schema=True).rule == "json"
    assert route(router, images=True).rule == "images"
    assert route(router).rule == "plain"
    assert route(router).reason == "no tools, no images"


def test_token_estimate_bounds() -> None:
    router = make_router(
        {"name": "long", "min_tokens": 3000, "model": "qwen"},
        {"name": "short", "max_tokens": 10, "model": "phi4"},
    )
    assert route(router, token_estimate=3000).rule == "long"
    assert route(router, token_estimate=3000).reason == "~3000 tokens"
    assert route(router, token_estimate=2999).rule == "default"
    assert route(router, token_estimate=10).rule == "short"


def test_the_token_estimate_errs_long() -> None:
    assert estimate_tokens("a" * 400) == 100
    assert estimate_tokens("数学" * 50) == 100  # CJK: about a token a character
    assert estimate_tokens("") == 0


def test_a_rule_without_conditions_matches_everything() -> None:
    assert route(make_router({"name": "all", "model": "qwen"})).reason == "always"


# -- targets ------------------------------------------------------------------------------


def test_targets_keep_their_order_unless_told_to_prefer_loaded_ones() -> None:
    rule = {"name": "long", "model": ["qwen", "mistral", "gemma3"]}
    fleet = Fleet(loaded=("gemma3",))
    assert route(make_router(rule), fleet=fleet).targets == ("qwen", "mistral", "gemma3")
    preferring = make_router({**rule, "prefer_loaded": True})
    assert route(preferring, fleet=fleet).targets == ("gemma3", "qwen", "mistral")
    assert route(preferring, fleet=Fleet()).targets == ("qwen", "mistral", "gemma3")


def test_a_target_that_cannot_serve_goes_last() -> None:
    router = make_router({"name": "tools", "model": ["mistral", "qwen"], "fallthrough": True})
    decision = route(router, fleet=Fleet(unavailable=("mistral",)))
    assert decision.targets == ("qwen", "mistral")
    assert decision.fallthrough


def test_aliases_in_rules_route_to_model_ids() -> None:
    settings = Settings.model_validate(
        {
            "models": [{"id": "phi4", "aliases": ["phi-4"], "path": "x.gguf"}],
            "router": {"default": "phi-4", "rules": [{"keywords": ["x"], "model": "phi-4"}]},
        }
    )
    assert settings.router is not None
    router = Router(settings.router, settings.model_id, Detector())
    assert route(router, "x").targets == ("phi4",)
    assert router.model_ids == ["phi4"]


# -- explanation ---------------------------------------------------------------------------


def test_the_route_header_is_ascii_and_names_rule_model_reason_and_refusals() -> None:
    decision = Decision("code", ("qwen", "mistral"), "keyword '代码'", True, "zh")
    header = decision.explain("mistral", (("qwen", "queue_full"),))
    assert header == (
        "rule=code; model=mistral; reason=keyword '\\u4ee3\\u7801'; language=zh; "
        "passed=qwen:queue_full"
    )
    header.encode("latin-1")  # a valid header value


def test_quoted_text_cannot_fake_or_break_the_header_parts() -> None:
    decision = Decision("code", ("qwen",), "keyword 'a; model=phi4\r\nX: 1 😀'")
    header = decision.explain("qwen")
    assert header.count(";") == 2 and header.count("=") == 3
    assert "\\u003b model\\u003dphi4\\u000d\\u000aX: 1 \\U0001f600" in header


def test_a_pattern_that_matches_nothing_visible_is_named_alone() -> None:
    router = make_router({"name": "digits", "patterns": [r"\A(?=.*\d)"], "model": "phi4"})
    assert route(router, "room 101").reason == "pattern 1"


# -- stickiness ---------------------------------------------------------------------------


def _turn(
    text: str, first: str = "Hi, can you help?", client: str = "key:0", **features: object
) -> RouteRequest:
    """A later turn (the first turn when `text` is `first`) of a conversation of `client`."""
    key = conversation_key(client, ["Be brief."], first)
    return RouteRequest(text=text, conversation=key, later_turn=text != first, **features)


def _placed(router: Router, first: RouteRequest, fleet=None) -> Decision:
    """Route a first turn and remember where it went, as the server does once accepted."""
    decision = router.decide(first, fleet or ColdFleet())
    router.remember(first, decision, decision.targets[0])
    return decision


CODE = {"name": "code", "keywords": ["python"], "model": "qwen"}


def test_a_conversation_stays_where_its_first_turn_went() -> None:
    router = make_router(CODE)
    assert _placed(router, _turn("Hi, can you help?")).rule == "default"
    later = router.decide(_turn("Write it in Python"), ColdFleet())
    assert (later.rule, later.targets) == ("sticky", ("gemma3",))
    assert later.reason == "conversation placed by default"
    router.remember(_turn("Write it in Python"), later, "gemma3")
    assert router.decide(_turn("and in python 2?"), ColdFleet()).reason.endswith("by default")
    other = router.decide(_turn("Write it in Python", first="Another chat"), ColdFleet())
    assert other.rule == "code"


def test_first_turns_are_routed_by_the_rules_even_when_a_twin_was_placed() -> None:
    """Two conversations that open alike are one key; only a later turn is steered by it."""
    router = make_router({"name": "tools", "tools": True, "model": "mistral"}, CODE)
    assert _placed(router, _turn("Hi, can you help?", tools=True)).targets == ("mistral",)
    twin = router.decide(_turn("Hi, can you help?"), ColdFleet())
    assert twin.rule == "default"


def test_one_clients_conversations_do_not_steer_anothers() -> None:
    router = make_router(CODE)
    _placed(router, _turn("Hi, can you help?", client="key:0"))
    elsewhere = router.decide(_turn("in Python", client="key:1"), ColdFleet())
    assert elsewhere.rule == "code"


def test_a_sticky_turn_falls_through_as_the_rule_that_placed_it() -> None:
    router = make_router(
        {"name": "multi", "languages": ["es"], "model": ["aya", "gemma3"], "fallthrough": True},
        detector=Detector("es"),
    )
    _placed(router, _turn("Hi, can you help?"))
    later = router.decide(_turn("Hola otra vez"), ColdFleet())
    assert (later.rule, later.targets, later.fallthrough) == ("sticky", ("aya", "gemma3"), True)


def test_a_need_outranks_the_conversation_unless_its_model_meets_it() -> None:
    router = make_router(
        {"name": "long", "min_tokens": 3000, "model": ["qwen", "mistral"], "fallthrough": True},
        {"name": "multi", "languages": ["en"], "model": "aya"},
    )
    _placed(router, _turn("Hi, can you help?"))  # to aya
    grown = router.decide(_turn("and more", token_estimate=5000), ColdFleet())
    assert (grown.rule, grown.targets) == ("long", ("qwen", "mistral"))  # aya's context is short
    router.remember(_turn("and more", token_estimate=5000), grown, "mistral")  # qwen was full
    longer = router.decide(_turn("and even more", token_estimate=6000), ColdFleet())
    assert (longer.rule, longer.targets, longer.fallthrough) == ("long", ("mistral", "qwen"), True)
    assert longer.reason == "~6000 tokens; the conversation's model first"
    short_again = router.decide(_turn("thanks"), ColdFleet())  # stays where it moved
    assert (short_again.rule, short_again.targets) == ("sticky", ("mistral", "qwen"))
    assert short_again.reason == "conversation placed by long"


def test_a_sticky_model_that_cannot_serve_is_routed_afresh() -> None:
    router = make_router(CODE)
    _placed(router, _turn("Hi, can you help?"))
    decision = router.decide(_turn("in Python"), Fleet(unavailable=("gemma3",)))
    assert decision.rule == "code"


def test_stickiness_can_be_turned_off() -> None:
    router = make_router(CODE, sticky=False)
    _placed(router, _turn("Hi, can you help?"))
    assert router.decide(_turn("in Python"), ColdFleet()).rule == "code"
    assert router.conversations == 0


def test_remembered_conversations_expire_and_are_bounded() -> None:
    now = [0.0]
    sticky = StickyMap(capacity=2, ttl=10, clock=lambda: now[0])
    a, b, c = (conversation_key("key:0", [], x) for x in "abc")
    sticky.put(a, Placement("qwen", "code"))
    sticky.put(b, Placement("phi4", "maths"))
    now[0] = 9.0
    assert sticky.get(a) == Placement("qwen", "code")  # a turn restarts the clock
    now[0] = 15.0
    assert sticky.count() == 1  # b expired 15 s after its turn
    assert sticky.get(b) is None
    assert sticky.get(a) is not None  # 6 s after its last turn
    sticky.put(b, Placement("phi4", "maths"))
    sticky.put(c, Placement("aya", "multi"))
    assert sticky.count() == 2
    assert sticky.get(a) is None  # the least recently used went first


def test_conversation_keys_tell_clients_system_prompts_and_first_messages_apart() -> None:
    keys = {
        conversation_key("key:0", ["ab", "c"], "x"),
        conversation_key("key:0", ["a", "bc"], "x"),
        conversation_key("key:0", [], "abcx"),
        conversation_key("key:0", ["abc"], "x"),
        conversation_key("key:0", ["abc"], "y"),
        conversation_key("key:1", ["abc"], "y"),
    }
    assert len(keys) == 6


# -- config checks --------------------------------------------------------------------------


def _config_error(tmp_path: Path, router: str, models: str = "") -> str:
    path = tmp_path / "config.toml"
    models = models or "".join(f'[[models]]\nid = "{m}"\npath = "x.gguf"\n' for m in MODELS)
    path.write_text(models + router)
    with pytest.raises(ConfigError) as error:
        load_settings(path)
    return str(error.value)


def test_config_errors_name_the_rule(tmp_path: Path) -> None:
    unknown = _config_error(
        tmp_path, '[router]\ndefault = "gemma3"\n[[router.rules]]\nname = "code"\nmodel = "qwn"\n'
    )
    assert "router rule 'code': no model is named 'qwn'" in unknown
    pattern = _config_error(
        tmp_path,
        '[router]\ndefault = "gemma3"\n[[router.rules]]\nname = "maths"\nmodel = "phi4"\n'
        "patterns = ['(unclosed']\n",
    )
    assert "router rule 'maths'" in pattern and "'(unclosed' is not a regular expression" in pattern
    unnamed = _config_error(
        tmp_path, '[router]\ndefault = "gemma3"\n[[router.rules]]\nmodel = ["qwen", "qwen"]\n'
    )
    assert "router rule 'rule1'" in unnamed and "listed twice" in unnamed
    default = _config_error(tmp_path, '[router]\ndefault = "gpt-4"\n')
    assert "router default: no model is named 'gpt-4'" in default
    both = _config_error(
        tmp_path,
        '[router]\ndefault = "gemma3"\n[[router.rules]]\nmodel = "aya"\n'
        'languages = ["es"]\nnot_languages = ["en"]\n',
    )
    assert "`languages` or `not_languages`" in both


def test_config_refuses_a_model_named_auto_and_embedding_targets(tmp_path: Path) -> None:
    auto = _config_error(
        tmp_path,
        '[router]\ndefault = "x"\n',
        '[[models]]\nid = "x"\naliases = ["auto"]\npath = "x.gguf"\n',
    )
    assert "'auto' is the router's" in auto
    embedding = _config_error(
        tmp_path,
        '[router]\ndefault = "e"\n',
        '[[models]]\nid = "e"\npath = "x.gguf"\nembedding = true\n',
    )
    assert "router default: 'e' is an embedding model" in embedding
    duplicate = _config_error(
        tmp_path,
        '[router]\ndefault = "gemma3"\n[[router.rules]]\nname = "a"\nmodel = "qwen"\n'
        '[[router.rules]]\nname = "a"\nmodel = "phi4"\n',
    )
    assert "rule name 'a' is used twice" in duplicate
