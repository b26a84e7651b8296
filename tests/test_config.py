"""Config files are validated at start with messages naming the file, the model and the field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from multiserve.config import ConfigError, load_settings


def test_toml_config_with_relative_paths(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text('port = 9000\n[[models]]\nid = "a"\npath = "m/a.gguf"\naliases = ["x"]\n')
    settings = load_settings(config)
    assert settings.port == 9000
    assert settings.host == "127.0.0.1"
    assert settings.models[0].path == tmp_path / "m" / "a.gguf"
    assert settings.models[0].names == ("a", "x")


def test_json_config_and_overrides(tmp_path: Path) -> None:
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"models": [{"id": "a", "path": "/m.gguf"}]}))
    settings = load_settings(config, {"port": 1234, "host": None})
    assert settings.port == 1234
    assert settings.host == "127.0.0.1"


def test_error_names_file_model_and_field(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text('[[models]]\nid = "phi"\npath = "p.gguf"\nkv_cache_type = "q3"\n')
    with pytest.raises(ConfigError) as error:
        load_settings(config)
    message = str(error.value)
    assert str(config) in message
    assert "model 'phi'" in message
    assert "kv_cache_type" in message


def test_unknown_field_is_an_error(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text("prot = 80\n")
    with pytest.raises(ConfigError, match="prot"):
        load_settings(config)


def test_duplicate_names_are_an_error(tmp_path: Path) -> None:
    config = tmp_path / "dup.toml"
    config.write_text(
        '[[models]]\nid = "a"\npath = "a.gguf"\n[[models]]\nid = "b"\npath = "b.gguf"\n'
        'aliases = ["a"]\n'
    )
    with pytest.raises(ConfigError, match="used twice"):
        load_settings(config)


def test_unreadable_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_settings(tmp_path / "missing.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("models = [\n")
    with pytest.raises(ConfigError, match="not valid"):
        load_settings(broken)
