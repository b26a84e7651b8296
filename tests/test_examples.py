"""The shipped example configs: valid as the schema evolves, answering to the seed's model names,
routing `auto` alike, and the offline one serving the seed's operators' curl commands."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

from conftest import run_server
from multiserve.config import load_settings

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
SEED_NAMES = {"phi4", "mistral", "qwen", "gemma3", "aya_expanse_multilingual"}


def test_experts_example_is_valid_and_answers_to_the_seed_names() -> None:
    settings = load_settings(EXAMPLES / "experts.toml")
    assert {m.id for m in settings.models} == SEED_NAMES
    assert settings.port == 8082
    assert sum(m.preload for m in settings.models) == 1
    assert settings.router is not None


def test_both_examples_route_alike() -> None:
    experts, offline = (
        tomllib.loads((EXAMPLES / name).read_text())["router"]
        for name in ("experts.toml", "offline.toml")
    )
    assert experts == offline


def test_offline_example_runs_here() -> None:
    settings = load_settings(EXAMPLES / "offline.toml")
    assert {m.id for m in settings.models} == SEED_NAMES
    assert all(m.path.is_file() for m in settings.models)
    listing = subprocess.run(
        [sys.executable, "-m", "multiserve", "models", "--config", str(EXAMPLES / "offline.toml")],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    assert listing.count("ready") == 5


def _route(text: str, *flags: str) -> dict:
    command = [sys.executable, "-m", "multiserve", "route", "--config"]
    command += [str(EXAMPLES / "offline.toml"), "--json", *flags, text]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60, check=True)
    return json.loads(result.stdout)


def test_route_command_prints_the_decision_without_a_server() -> None:
    spanish = _route("¿Qué me recomiendas visitar en Sevilla en primavera?")
    assert (spanish["rule"], spanish["models"]) == ("multilingual", ["aya_expanse_multilingual"])
    assert spanish["language"] == "es"
    assert spanish["decision_ms"] < 50
    assert _route("Solve 3x + 5 = 20")["models"] == ["phi4"]
    assert _route("why does my python script crash")["models"] == ["qwen"]
    assert _route("book me a table", "--tools")["models"] == ["mistral", "qwen"]
    assert _route("Tell me a story about a dragon")["rule"] == "default"


def _curl(*args: str) -> str:
    result = subprocess.run(["curl", "-sS", *args], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_the_seed_operators_commands_work_on_the_offline_example(tmp_path: Path) -> None:
    """The four commands the seed's operators use, as they type them (but for the free port a
    test must take instead of 8082), then `auto` sending a Spanish message to Aya's id."""
    config = str(EXAMPLES / "offline.toml")
    with run_server(["--config", config], tmp_path) as server:
        base = server.url.replace("127.0.0.1", "localhost")
        assert json.loads(_curl(f"{base}/health"))["status"] == "ok"
        listed = {card["id"] for card in json.loads(_curl(f"{base}/v1/models"))["data"]}
        assert listed == SEED_NAMES | {"auto"}
        assert set(json.loads(_curl(f"{base}/stats"))["models"]) == SEED_NAMES
        body = {
            "model": "aya_expanse_multilingual",
            "messages": [{"role": "user", "content": "Hola, ¿cómo estás?"}],
            "max_tokens": 8,
        }
        chat = _curl(
            f"{base}/v1/chat/completions",
            "-H",
            "Content-Type: application/json",
            "-d",
            json.dumps(body),
        )
        assert json.loads(chat)["model"] == "aya_expanse_multilingual"
        body["model"] = "auto"
        body["messages"][0]["content"] = "¿Qué es un agujero negro y cómo se forma?"
        with server.http() as http:
            routed = http.post("/v1/chat/completions", json=body)
        assert routed.status_code == 200, routed.text
        assert routed.json()["model"] == "aya_expanse_multilingual"
        assert routed.headers["x-multiserve-route"].startswith("rule=multilingual;")
