"""Keyword lists matched in microseconds, however long the list or the message.

A regular expression of a few hundred alternatives costs about 4 µs per character of message in
Python's engine (17 ms for 4,000 characters), so keywords are matched on words instead: the
message is cut into words once, single words are looked up in a set, word stems (`stem*`) in a
trie-shaped expression tried only at word starts, phrases as substrings of the spaced words.
Scripts written without spaces (Chinese, Japanese, Thai, and Korean, whose particles join the
word) have no word boundaries to respect: their keywords match anywhere.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

_UNSPACED = re.compile(r"[\u0e00-\u0e7f\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af]")
# a word: letters and digits, with the + # . that name things like c++, c#, node.js inside
_WORD = re.compile(r"\w[\w+#.]*")


def words_of(text: str) -> list[str]:
    """The message's words, case-folded; unspaced scripts split off (`SQLで` holds `sql`); a
    dotted name is a word and so are its parts (`package.json`: `package`, `json`)."""
    words = []
    for word in _WORD.findall(_UNSPACED.sub(" ", text.casefold())):
        word = word.rstrip(".")
        words.append(word)
        if "." in word:
            words += word.split(".")
    return words


def _trie(words: Iterable[str]) -> str:
    """A regex alternation of `words` factored by common prefixes, so the engine tries one
    branch per character instead of every word."""
    root: dict = {}
    for word in words:
        node = root
        for char in word:
            node = node.setdefault(char, {})
        node[""] = {}

    def emit(node: dict) -> str:
        branches = [re.escape(char) + emit(child) for char, child in sorted(node.items()) if char]
        if not branches:
            return ""
        body = branches[0] if len(branches) == 1 else "(?:" + "|".join(branches) + ")"
        return f"(?:{body})?" if "" in node else body

    return emit(root)


class KeywordMatcher:
    """Finds the first of a rule's keywords in a message: whole words in any case; `stem*`
    for any ending; phrases of several words; anywhere in unspaced scripts."""

    def __init__(self, keywords: Iterable[str]) -> None:
        self._words: set[str] = set()
        stems: list[str] = []
        self._phrases: list[tuple[str, str]] = []  # (as matched, as configured)
        self._unspaced: list[str] = []
        for keyword in keywords:
            stem = keyword.endswith("*")
            folded = " ".join(words_of(keyword.rstrip("*")))
            if _UNSPACED.search(keyword):
                self._unspaced.append(keyword.rstrip("*").casefold())
            elif " " in folded:
                self._phrases.append((f" {folded}" if stem else f" {folded} ", keyword))
            elif stem:
                stems.append(folded)
            elif folded:
                self._words.add(folded)
        self._stems = re.compile(" " + _trie(stems) + "[^ ]*") if stems else None

    def __bool__(self) -> bool:
        return bool(self._words or self._stems or self._phrases or self._unspaced)

    def find(self, text: str, words: list[str]) -> str | None:
        """The keyword found in `text` (its `words` from `words_of`), or None."""
        if hit := self._words.intersection(words):
            return min(hit)
        joined = " " + " ".join(words) + " "
        if self._stems is not None and (found := self._stems.search(joined)):
            return found.group(0).strip()
        for phrase, keyword in self._phrases:
            if phrase in joined:
                return keyword
        if self._unspaced:
            folded = text.casefold()
            for keyword in self._unspaced:
                if keyword in folded:
                    return keyword
        return None
