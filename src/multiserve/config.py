"""Server settings and model specs: loaded from TOML or JSON, validated once at start.

Errors name the file, the model and the field, so a typo in a config never surfaces later as a
confusing runtime failure.
"""

from __future__ import annotations

import json
import os
import tomllib
from pathlib import Path
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from multiserve.engine.lease import MAX_WAITERS
from multiserve.router.config import AUTO_MODEL, RouterConfig

MODEL_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.:/-]*$"  # ids and aliases: safe in URLs and labels
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


class SamplingDefaults(BaseModel):
    """Per-model defaults for sampling fields a request leaves out."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=0, le=1 << 20)
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    repeat_penalty: float | None = Field(default=None, ge=0.01, le=10.0)
    max_tokens: int | None = Field(default=None, ge=1)

    def given(self) -> dict[str, float | int]:
        return {k: v for k, v in self.model_dump().items() if v is not None}


# n_ctx (longest input) and step_tokens (tokens embedded in one decode) of an embedding model
# that sets neither: inputs of up to 512 tokens, several of them in each step
EMBEDDING_SHAPE = {"n_ctx": 512, "step_tokens": 512}


class ModelSpec(BaseModel):
    """One servable model: which GGUF, under which names, with which runtime shape."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(min_length=1, max_length=128, pattern=MODEL_NAME)
    path: Path
    aliases: tuple[
        Annotated[str, Field(min_length=1, max_length=128, pattern=MODEL_NAME)],
        ...,
    ] = ()
    n_ctx: int = Field(default=4096, ge=64, le=1 << 20, description="context per sequence")
    n_parallel: int = Field(default=8, ge=1, le=256, description="sequence slots")
    step_tokens: int = Field(
        default=256, ge=16, le=8192, description="token budget of one batched decode step"
    )
    threads: int | None = Field(default=None, ge=1, le=1024)
    replicas: int = Field(
        default=1, ge=1, le=64, description="copies on distinct Ray nodes (needs ray_address)"
    )
    kv_cache_type: Literal["f16", "q8_0", "q4_0"] = "f16"
    flash_attn: bool = Field(
        default=True, description="llama.cpp's flash attention (skips other slots' cells)"
    )
    mmap: bool = Field(
        default=False,
        description="memory-map the GGUF file instead of reading it in: where llama.cpp repacks "
        "weights for the CPU (Q4_K and others on x86 and Arm) the mapped pages stay resident "
        "beside the repacked copy, up to 1.75x the weights' memory",
    )
    prefix_cache: bool = Field(default=True, description="reuse cached prompt prefixes")
    host_cache: str = Field(
        default="auto",
        description="prompt cache in host memory: a size ('1GiB', '0' for none) or 'auto', a "
        "quarter of the model's KV cache",
    )
    swa_full: bool = Field(
        default=True, description="sliding-window models keep every cell (any prefix reusable)"
    )
    chat_template: str | None = None
    preload: bool = Field(default=False, description="load at server start")
    pinned: bool = Field(default=False, description="never evicted or unloaded for idleness")
    idle_ttl: float | None = Field(default=None, gt=0, description="unload after idle seconds")
    queue_limit: int = Field(default=32, ge=0, le=100_000, description="requests beyond slots")
    queue_timeout: float = Field(default=60.0, gt=0, description="seconds a request may wait")
    stall_timeout: float = Field(
        default=120.0,
        gt=0,
        description="seconds a worker with requests may go without finishing a step before it "
        "is killed as hung (its requests get 503 model_crashed)",
    )
    defaults: SamplingDefaults = Field(default_factory=SamplingDefaults)
    embedding: bool = Field(
        default=False, description="an embedding model: answers /v1/embeddings only"
    )
    pooling: Literal["mean", "cls", "last"] | None = Field(
        default=None,
        description="how an embedding model makes one vector of an input's tokens (default: "
        "the pooling its GGUF names, else mean)",
    )
    normalize: bool = Field(default=True, description="embeddings scaled to unit (L2) length")
    embeddings_model: str | None = Field(
        default=None,
        description="id of the embedding model that answers /v1/embeddings for this model",
    )

    @model_validator(mode="before")
    @classmethod
    def _embedding_shape(cls, data: object) -> object:
        """An embedding model reads each input whole in one step, so its defaults are a step
        that holds the longest input (the generative defaults would not)."""
        if isinstance(data, dict) and data.get("embedding") is True:
            return {**EMBEDDING_SHAPE, **data}
        return data

    @model_validator(mode="after")
    def _input_fits_one_step(self) -> ModelSpec:
        if self.embedding and self.step_tokens < self.n_ctx:
            raise ValueError(
                f"step_tokens ({self.step_tokens}) must be at least n_ctx ({self.n_ctx}) for an "
                "embedding model: each input is read whole in one step"
            )
        return self

    @model_validator(mode="after")
    def _batch_holds_every_sequence(self) -> ModelSpec:
        if self.step_tokens < self.n_parallel:
            raise ValueError(
                f"step_tokens ({self.step_tokens}) must be at least n_parallel "
                f"({self.n_parallel}): every running sequence needs a token in each step"
            )
        return self

    @field_validator("host_cache", mode="before")
    @classmethod
    def _host_cache_is_a_size(cls, value: object) -> str:
        text = str(value).strip()
        if text != "auto" and (text.endswith("%") or parse_size(text) < 0):
            raise ValueError("host_cache must be 'auto' or a size such as '512MiB', or 0")
        return text

    def host_cache_bytes(self, kv_cache_bytes: int) -> int:
        """The host prompt cache's bound for a KV cache of this size (0 with prefix reuse off)."""
        if not self.prefix_cache or self.embedding:
            return 0
        return kv_cache_bytes // 4 if self.host_cache == "auto" else parse_size(self.host_cache)

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
    memory_budget: str = Field(
        default="80%", description="bytes ('12GiB', '800MB', 1e9) or a share of MemAvailable"
    )
    max_loaded_models: int | None = Field(default=None, ge=1)
    model_turn: float = Field(
        default=15.0,
        ge=0,
        description="seconds a busy model keeps its memory before it gives way to a model "
        "waiting for room",
    )
    load_timeout: float = Field(default=120.0, gt=0, description="seconds a model load may take")
    share_cores: bool = Field(default=True, description="busy models take turns on the cores")
    worker_nice: int = Field(
        default=10,
        ge=0,
        le=19,
        description="scheduling niceness of model workers, so the API process answers at once",
    )
    api_keys: list[str] = Field(default_factory=list, description="accepted Bearer keys")
    api_keys_file: Path | None = Field(default=None, description="file with one key per line")
    metrics_public: bool = Field(default=False, description="serve /metrics without a key")
    cors_origins: list[str] = Field(default_factory=list, description="browser origins allowed")
    max_body_bytes: int = Field(default=4 * 2**20, ge=1024, le=2**30)
    max_header_bytes: int = Field(
        default=32 * 2**10, ge=1024, le=2**24, description="request line plus headers"
    )
    header_timeout: float = Field(
        default=15.0, gt=0, le=3600, description="seconds a client may take to send a head"
    )
    body_timeout: float = Field(
        default=60.0, gt=0, le=3600, description="seconds a client may take to send a body"
    )
    max_connections: int = Field(default=512, ge=1, le=1_000_000)
    requests_per_minute: int | None = Field(
        default=None, ge=1, description="completion requests a minute per key (or address)"
    )
    rate_limit_burst: int | None = Field(
        default=None, ge=1, description="requests a client may send at once; default rpm / 6"
    )
    drain_timeout: float = Field(
        default=10.0, ge=0, description="seconds in-flight requests may finish on SIGTERM/SIGINT"
    )
    ray_address: str | None = Field(
        default=None,
        description="run model workers on this Ray cluster: its head's host:port, or `auto` for "
        "the cluster this machine joined with `ray start`",
    )
    models: list[ModelSpec] = Field(default_factory=list)
    router: RouterConfig | None = Field(
        default=None, description='rules that send `"model": "auto"` requests to a model'
    )

    @field_validator("memory_budget", mode="before")
    @classmethod
    def _budget_is_parseable(cls, value: object) -> str:
        text = str(value).strip()
        parse_budget(text, available=1)  # raises ValueError with a clear message
        return text

    @model_validator(mode="after")
    def _lease_has_room(self) -> Settings:
        if self.share_cores and len(self.models) >= MAX_WAITERS:  # every worker and the spare
            raise ValueError(
                f"at most {MAX_WAITERS - 1} models with share_cores = true (got {len(self.models)})"
            )
        return self

    @model_validator(mode="after")
    def _replicas_need_a_cluster(self) -> Settings:
        replicated = [spec.id for spec in self.models if spec.replicas > 1]
        if replicated and self.ray_address is None:
            raise ValueError(
                f"replicas > 1 ({', '.join(replicated)}) needs a Ray cluster: set ray_address "
                "or pass --ray (one machine runs one copy of each model)"
            )
        return self

    @model_validator(mode="after")
    def _embeddings_models_exist(self) -> Settings:
        embedding = {spec.id for spec in self.models if spec.embedding}
        for spec in self.models:
            target = spec.embeddings_model
            if target is not None and (spec.embedding or target not in embedding):
                raise ValueError(
                    f"model {spec.id!r}: embeddings_model must name a model with embedding = "
                    f"true (got {target!r})"
                )
        return self

    @model_validator(mode="after")
    def _names_are_unique(self) -> Settings:
        seen: set[str] = set()
        for spec in self.models:
            for name in spec.names:
                if name in seen:
                    raise ValueError(f"model name {name!r} is used twice")
                seen.add(name)
        return self

    @model_validator(mode="after")
    def _router_names_models(self) -> Settings:
        if self.router is None:
            return self
        specs = {name: spec for spec in self.models for name in spec.names}
        if AUTO_MODEL in specs:
            raise ValueError(f"model name {AUTO_MODEL!r} is the router's: rename that model")
        for rule, name in self.router.model_names():
            where = "router default" if rule == "default" else f"router rule {rule!r}"
            if name not in specs:
                raise ValueError(f"{where}: no model is named {name!r}")
            if specs[name].embedding:
                raise ValueError(f"{where}: {name!r} is an embedding model")
        return self

    def model_id(self, name: str) -> str:
        """The id of the model an id or alias names (KeyError if none)."""
        for spec in self.models:
            if name in spec.names:
                return spec.id
        raise KeyError(name)

    def all_api_keys(self) -> list[str]:
        """Keys from the config, the MULTISERVE_API_KEYS variable (comma-separated) and the file."""
        keys = list(self.api_keys)
        keys += [k for k in os.environ.get("MULTISERVE_API_KEYS", "").split(",") if k.strip()]
        if self.api_keys_file is not None:
            try:
                lines = self.api_keys_file.read_text(encoding="utf-8").splitlines()
            except OSError as exc:
                raise ConfigError(f"api_keys_file: cannot read it: {exc.strerror}") from None
            keys += [line for line in lines if line.strip() and not line.startswith("#")]
        return [k.strip() for k in keys]

    def threads_for(self, spec: ModelSpec) -> int:
        return spec.threads or self.threads


_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


def parse_budget(text: str, available: int) -> int:
    """'80%' of `available`, or an absolute size such as '12GiB', '800MB', '1e9' in bytes."""
    text = text.strip().lower().replace(" ", "")
    if text.endswith("%"):
        share = float(text[:-1])
        if not 0 < share <= 100:
            raise ValueError("a memory budget share must be between 0% and 100%")
        return int(available * share / 100)
    size = parse_size(text)
    if size <= 0:
        raise ValueError("a memory budget must be positive")
    return size


def parse_size(text: str) -> int:
    """A size in bytes from '12GiB', '800MB', '1e9' or '0'."""
    text = text.strip().lower().replace(" ", "")
    number = text.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = text[len(number) :]
    try:
        if unit not in _UNITS or not number:
            raise ValueError
        return int(float(number) * _UNITS[unit])
    except (ValueError, OverflowError):
        raise ValueError(f"cannot read size {text!r}; use e.g. '12GiB' or '800MB'") from None


def _listed(items: object, index: int, key: str) -> object:
    """`items[index][key]` of raw config, or None where that is not there."""
    if isinstance(items, list) and index < len(items) and isinstance(items[index], dict):
        return items[index].get(key)
    return None


def _within(owner: str, loc: list) -> str:
    return f"{owner}: " + ".".join(str(part) for part in loc) if loc else owner


def _format_validation_error(source: str, error: ValidationError, raw: dict) -> str:
    lines = [f"{source}: invalid configuration"]
    for item in error.errors():
        loc = list(item["loc"])
        where = ".".join(str(part) for part in loc) or "(top level)"
        if len(loc) >= 2 and loc[0] == "models" and isinstance(loc[1], int):
            model_id = _listed(raw.get("models"), loc[1], "id")
            if isinstance(model_id, str):
                where = _within(f"model {model_id!r}", loc[2:])
        if loc[:2] == ["router", "rules"] and len(loc) >= 3 and isinstance(loc[2], int):
            router = raw.get("router") if isinstance(raw.get("router"), dict) else {}
            name = _listed(router.get("rules"), loc[2], "name")
            if not isinstance(name, str):
                name = f"rule{loc[2] + 1}"  # as the router names an unnamed rule
            where = _within(f"router rule {name!r}", loc[3:])
        lines.append(f"  {where}: {item['msg']}")
    return "\n".join(lines)


EMBEDDED_MODEL = "embedded:gemma-3-270m"
# The embedded model is a base model that rarely stops on its own: a request that sets no
# max_tokens gets this many tokens (seconds), not the rest of its context (minutes).
EMBEDDED_MAX_TOKENS = 256


def _model_path(value: str, base: Path) -> Path:
    """A model path relative to its config file, or the embedded default model."""
    if value == EMBEDDED_MODEL:
        from multiserve.models.default import default_model_path

        return default_model_path()
    return base / Path(value).expanduser()


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
        for model in raw.get("models") or []:
            if isinstance(model, dict) and isinstance(model.get("path"), str):
                if model["path"] == EMBEDDED_MODEL and isinstance(model.get("defaults", {}), dict):
                    model["defaults"] = {
                        "max_tokens": EMBEDDED_MAX_TOKENS,
                        **model.get("defaults", {}),
                    }
                model["path"] = str(_model_path(model["path"], path.parent))
    raw.update({k: v for k, v in (overrides or {}).items() if v is not None})
    try:
        return Settings.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(source, exc, raw)) from None
