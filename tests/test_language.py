"""Language detection as the router uses it: the model inside the package, nothing fetched."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from multiserve.router.language import detect_language

SENTENCES = {
    "en": "Could you suggest a quiet place for dinner near the station tonight?",
    "es": "¿Me recomiendas un libro para aprender a cocinar platos sencillos?",
    "fr": "Je cherche une idée de cadeau pour l'anniversaire de ma sœur.",
    "de": "Wie lange sollte ich die Kartoffeln kochen, bevor ich sie brate?",
    "ar": "ما هي أفضل طريقة لتعلم لغة جديدة في وقت قصير؟",
    "hi": "मुझे दिल्ली में घूमने के लिए कुछ अच्छी जगहें बताइए।",
    "ja": "週末に京都へ行くのですが、おすすめの場所はありますか",
    "zh": "请推荐几本适合初学者的历史书。",
    "sw": "Habari za asubuhi, ninaomba ushauri kuhusu safari yangu ya Mombasa.",
}


@pytest.mark.parametrize("language", SENTENCES)
def test_each_language_is_told(language: str) -> None:
    assert detect_language(SENTENCES[language]) == language


def test_han_characters_without_kana_are_chinese() -> None:
    """fastText alone reads these simplified-Chinese phrases as Japanese; a Japanese sentence
    almost always holds kana, a Chinese one never does."""
    assert detect_language("大学入学考试") == "zh"
    assert detect_language("天气预报") == "zh"


def test_code_and_guesses_have_no_language() -> None:
    assert detect_language("```\nfor i in range(10): print(i)\n```") is None
    assert detect_language("2+2?") is None  # the model's best label is a guess
    assert detect_language("   ") is None


def test_a_lone_surrogate_is_not_an_error() -> None:
    """JSON can carry one ("\\udc00"); the model's binding refuses such a string."""
    assert detect_language("\udc00 Hola, ¿me ayudas con una receta de paella?") == "es"


def test_code_in_a_message_does_not_hide_its_language() -> None:
    text = "¿Por qué `np.array(x).reshape(-1, 1)` me da un error con esta lista de números?"
    assert detect_language(text) == "es"


def test_detection_downloads_nothing(tmp_path: Path) -> None:
    """The model ships in the wheel: with no home, cache or temp directory of its own the
    detector still answers, and writes nothing (the library's default would fetch 126 MB)."""
    for name in ("home", "cache", "tmp"):
        (tmp_path / name).mkdir()
    env = {
        **os.environ,
        "HOME": str(tmp_path / "home"),
        "XDG_CACHE_HOME": str(tmp_path / "cache"),
        "TMPDIR": str(tmp_path / "tmp"),
        "HTTPS_PROXY": "http://127.0.0.1:9",  # any fetch would fail, not hang
        "HTTP_PROXY": "http://127.0.0.1:9",
    }
    script = (
        "from multiserve.router.language import detect_language as d\n"
        "print(d('Bonjour à tous, comment allez-vous ?'))"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.stdout.strip() == "fr", result.stderr
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []
