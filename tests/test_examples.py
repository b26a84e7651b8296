"""The shipped example configs stay valid as the config schema evolves."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from multiserve.config import load_settings

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_experts_example_is_valid() -> None:
    settings = load_settings(EXAMPLES / "experts.toml")
    assert [m.id for m in settings.models] == ["qwen", "phi-4", "mistral", "gemma-3", "aya-expanse"]
    assert sum(m.preload for m in settings.models) == 1


def test_offline_example_runs_here() -> None:
    settings = load_settings(EXAMPLES / "offline.toml")
    assert all(m.path.is_file() for m in settings.models)
    listing = subprocess.run(
        [sys.executable, "-m", "multiserve", "models", "--config", str(EXAMPLES / "offline.toml")],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    assert listing.count("ready") == 2
