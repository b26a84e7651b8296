"""Prompts that differ from the first words on, so no two requests share a cached prefix."""

from __future__ import annotations

_TOPICS = (
    "a lighthouse keeper",
    "a clockmaker's apprentice",
    "a lost mountain village",
    "a ship made of glass",
    "the last library on earth",
    "a fox who learned to read",
    "a city under the sea",
    "an old train station",
    "a garden on the moon",
    "a forgotten radio signal",
    "a painter who could not see",
    "a bridge between two winters",
)


def prompt_text(i: int) -> str:
    """A distinct, similarly sized prompt for every request (no two share a prefix by accident)."""
    return f"Story {i}: a long tale about {_TOPICS[i % len(_TOPICS)]}. Once upon a time,"
