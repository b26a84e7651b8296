"""Bench prompts: deterministic synthetic prompts of the chosen length, and JSONL prompt files."""

from __future__ import annotations

from pathlib import Path

import pytest

from multiserve.bench.workload import WorkloadError, make_workload


def test_synthetic_prompts_are_deterministic_and_distinct() -> None:
    one = make_workload("completions", 50, 16, seed=7)
    again = make_workload("completions", 50, 16, seed=7)
    other = make_workload("completions", 50, 16, seed=8)
    assert one.prompt(3) == again.prompt(3)
    assert one.prompt(3) != one.prompt(4) != other.prompt(4)
    prompt = one.prompt(0)
    assert len(prompt.prompt.split()) == 50 and prompt.max_tokens == 16
    chat = make_workload("chat", 5, 2, seed=7).prompt(0)
    assert chat.prompt is None and chat.messages[0]["role"] == "user"


def test_prompts_file(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    path.write_text(
        '{"prompt": "a b c", "max_tokens": 3}\n\n'
        '{"messages": [{"role": "system", "content": "be brief"},'
        ' {"role": "user", "content": "hi"}]}\n'
    )
    work = make_workload("chat", 10, 8, seed=0, prompts_file=path)
    first, second = work.prompt(0), work.prompt(1)
    assert first.messages == [{"role": "user", "content": "a b c"}] and first.max_tokens == 3
    assert second.messages[0]["content"] == "be brief" and second.max_tokens == 8
    assert second.approx_input_tokens == 3
    assert work.prompt(2) == first  # a short file cycles
    with pytest.raises(WorkloadError, match="needs --endpoint chat"):
        make_workload("completions", 10, 8, seed=0, prompts_file=path)


@pytest.mark.parametrize(
    ("line", "words"),
    [
        ("not json", "line 1: invalid JSON"),
        ('{"text": "x"}', 'needs "prompt" or "messages"'),
        ('{"prompt": "x", "max_tokens": 0}', "max_tokens must be a positive integer"),
        ('{"messages": "hi"}', "messages must be a list"),
    ],
)
def test_bad_prompt_files(tmp_path: Path, line: str, words: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(line + "\n")
    with pytest.raises(WorkloadError, match=words):
        make_workload("chat", 10, 8, seed=0, prompts_file=path)
    with pytest.raises(WorkloadError, match="cannot read"):
        make_workload("chat", 10, 8, seed=0, prompts_file=tmp_path / "missing.jsonl")
