"""Server settings and model specs: loaded from TOML or JSON, validated once at start.

Errors name the file, the model and the field, so a typo in a config never surfaces later as a
confusing runtime failure.
"""

from __future__ import annotations

import json
import os
import tomllib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8082


class ConfigError(ValueError):
    """A config file or flag is wrong; the message says where and why."""


def default_threads() -> int:
    """Physical cores are what matter for llama.cpp's matmuls; hyperthreads add little."""
    try:
        import psutil

        return psutil.cpu_count(logical=False) or os.cpu_count() or 1
    except ImportError:  # pragma: no cover - psutil is a hard dependency
        return os.cpu_count() or 1


class ModelSpec(BaseModel):
    """One servable model: which GGUF, under which names, with which runtime shape."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:/-]*$")
    path: Path
    aliases: tuple[str, ...] = ()
    n_ctx: int = Field(default=4096, ge=64, le=1 << 20, description="context per sequence")
    n_parallel: int = Field(default=8, ge=1, le=256, description="sequence slots")
    step_tokens: int = Field(
        default=256, ge=16, le=8192, description="token budget of one batched decode step"
    )
    threads: int | None = Field(default=None, ge=1, le=1024)
    kv_cache_type: Literal["f16", "q8_0", "q4_0"] = "f16"
    flash_attn: bool = False
    chat_template: str | None = None

    @property
    def names(self) -> tuple[str, ...]:
        return (self.id, *self.aliases)


class Settings(BaseModel):
    """Everything `multiserve serve` needs."""

    model_config = ConfigDict(extra="forbid")

    host: str = DEFAULT_HOST
    port: int = Field(default=DEFAULT_PORT, ge=1, le=65535)
    threads: int = Field(default_factory=default_threads, ge=1, le=1024)
    max_n: int = Field(default=16, ge=1, le=256, description="largest `n` a request may ask")
    models: list[ModelSpec] = Field(default_factory=list)

    @model_validator(mode="after")
    def _names_are_unique(self) -> Settings:
        seen: set[str] = set()
        for spec in self.models:
            for name in spec.names:
                if name in seen:
                    raise ValueError(f"model name {name!r} is used twice")
                seen.add(name)
        return self

    def threads_for(self, spec: ModelSpec) -> int:
        return spec.threads or self.threads


def _format_validation_error(source: str, error: ValidationError, raw: dict) -> str:
    lines = [f"{source}: invalid configuration"]
    for item in error.errors():
        loc = list(item["loc"])
        where = ".".join(str(part) for part in loc) or "(top level)"
        if len(loc) >= 2 and loc[0] == "models" and isinstance(loc[1], int):
            models = raw.get("models") or []
            model_id = models[loc[1]].get("id") if loc[1] < len(models) else None
            if isinstance(model_id, str):
                where = f"model {model_id!r}: " + ".".join(str(p) for p in loc[2:])
        lines.append(f"  {where}: {item['msg']}")
    return "\n".join(lines)


def load_settings(path: Path | None, overrides: dict | None = None) -> Settings:
    """Read a TOML (or JSON) config, apply CLI overrides, validate; raise ConfigError."""
    raw: dict = {}
    source = "command line"
    if path is not None:
        source = str(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read config: {exc.strerror}") from None
        try:
            raw = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
        except (json.JSONDecodeError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(
                f"{path}: not valid {path.suffix.lstrip('.') or 'TOML'}: {exc}"
            ) from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: top level must be a table")
        base = path.parent
        for model in raw.get("models") or []:
            if isinstance(model, dict) and isinstance(model.get("path"), str):
                model["path"] = str(base / Path(model["path"]).expanduser())
    raw.update({k: v for k, v in (overrides or {}).items() if v is not None})
    try:
        return Settings.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(source, exc, raw)) from None
