"""Prompts for the shape-true models, counted in tokens rather than characters.

The shape-true vocabularies hold the 256 byte tokens and word pieces `▁w0`, `▁w1`, ... that no
text reaches (llama.cpp's SentencePiece tokenizer builds a piece from smaller pieces, and `▁w` is
none), so every byte of a prompt is one token: English prose would cost four times the tokens a
real tokenizer makes of it, and a space (`▁`, three bytes) three. A run of letters without spaces
is one token per letter, so a message of N letters costs what N tokens of a real one cost (give or
take the few the tokenizer and the chat template add).

For the same reason a model's answer, sent back as the next turn's history, would not read back as
the tokens it was generated as (`▁w123` becomes seven byte tokens); a real tokenizer reads an
answer back as it wrote it. So the history carries a stand-in of the answer's length in tokens.
"""

from __future__ import annotations

import random
import string


def tokens(rng: random.Random, n: int) -> str:
    """Text of `n` tokens for these models (random lowercase letters)."""
    return "".join(rng.choices(string.ascii_lowercase, k=n))


def history(
    rng: random.Random, system_tokens: int, exchanges: int, user_tokens: int, answer_tokens: int
) -> list[dict[str, str]]:
    """A system message and `exchanges` earlier user/assistant turns: a chat under way."""
    messages = [{"role": "system", "content": tokens(rng, system_tokens)}]
    for _ in range(exchanges):
        messages.append({"role": "user", "content": tokens(rng, user_tokens)})
        messages.append({"role": "assistant", "content": tokens(rng, answer_tokens)})
    return messages


def answered(rng: random.Random, generated: int) -> dict[str, str]:
    """The assistant message a client sends back after an answer of `generated` tokens."""
    return {"role": "assistant", "content": tokens(rng, generated)}
