"""Command line: `multiserve serve` runs the server, `multiserve models` describes a config."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import sys
from pathlib import Path

from pydantic import ValidationError

from multiserve.config import (
    DEFAULT_HOST,
    DEFAULT_PORT,
    ConfigError,
    ModelSpec,
    Settings,
    load_settings,
)


def _parser() -> argparse.ArgumentParser:
    models_from = argparse.ArgumentParser(add_help=False)
    models_from.add_argument("--config", type=Path, help="TOML or JSON config file")
    models_from.add_argument("--model", type=Path, help="a GGUF file (beside the config's)")
    models_from.add_argument("--model-id", help="id to serve --model under (default: file stem)")
    models_from.add_argument("--parallel", type=int, default=8, help="sequence slots for --model")
    models_from.add_argument("--ctx", type=int, default=4096, help="context per sequence, --model")

    parser = argparse.ArgumentParser(prog="multiserve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", parents=[models_from], help="run the OpenAI-compatible server")
    serve.add_argument("--host", help=f"bind address (default {DEFAULT_HOST})")
    serve.add_argument("--port", type=int, help=f"port (default {DEFAULT_PORT})")
    serve.add_argument("--threads", type=int, help="compute threads (default: physical cores)")
    sub.add_parser("models", parents=[models_from], help="list models: size, memory, state")
    return parser


def _settings(args: argparse.Namespace) -> Settings:
    """The config file, plus `--model` (or, with no models at all, the embedded default)."""
    overrides = {k: getattr(args, k, None) for k in ("host", "port", "threads")}
    settings = load_settings(args.config, overrides)
    model = args.model
    if model is None and settings.models:
        return settings
    if model is None:
        from multiserve.models.default import DEFAULT_MODEL_ID, default_model_path

        model, model_id = default_model_path(), DEFAULT_MODEL_ID
    else:
        if not model.is_file():
            raise ConfigError(f"--model: file not found: {model}")
        model_id = args.model_id or model.stem
    try:
        spec = ModelSpec(
            id=model_id,
            path=model.resolve(),
            n_parallel=args.parallel,
            n_ctx=args.ctx,
            preload=True,
        )
        return Settings(**{**dict(settings), "models": [spec, *settings.models]})
    except ValidationError as exc:
        problem = exc.errors()[0]
        where = ".".join(str(p) for p in problem["loc"]) or "model"
        raise ConfigError(f"command line: {where}: {problem['msg']}") from None


def exposure_warning(settings: Settings) -> str | None:
    """What to shout when the server would be open to the network without API keys."""
    try:
        loopback = ipaddress.ip_address(settings.host).is_loopback
    except ValueError:
        loopback = settings.host == "localhost"
    if loopback or settings.all_api_keys():
        return None
    return (
        f"binding {settings.host} with no API keys: anyone who can reach this port can use "
        "every model. Set api_keys (or MULTISERVE_API_KEYS)."
    )


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from multiserve.api.app import create_app

    settings = _settings(args)
    if warning := exposure_warning(settings):
        print(f"multiserve: WARNING: {warning}", file=sys.stderr)
    app = create_app(settings)
    print(
        f"multiserve: serving {', '.join(s.id for s in settings.models)} on "
        f"http://{settings.host}:{settings.port}",
        file=sys.stderr,
    )
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_level="warning",
        timeout_graceful_shutdown=10,
    )
    return 0


def _models(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from multiserve.fleet.gguf_header import GGUFError, read_header
    from multiserve.fleet.memory import estimate_memory, format_bytes

    settings = _settings(args)
    table = Table("id", "aliases", "file size", "estimated memory", "state")
    for spec in settings.models:
        size = estimate = "-"
        try:
            header = read_header(spec.path)
            size = format_bytes(spec.path.stat().st_size)
            est = estimate_memory(header, spec)
            estimate = (
                f"{format_bytes(est.total)} (weights {format_bytes(est.weights)}, "
                f"KV {format_bytes(est.kv_cache)})"
            )
            state = "ready"
        except FileNotFoundError:
            state = "[red]file not found[/red]"
        except (GGUFError, OSError) as exc:
            state = f"[red]unreadable: {exc}[/red]"
        table.add_row(spec.id, ", ".join(spec.aliases), size, estimate, state)
    Console().print(table)
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    args = _parser().parse_args(argv)
    try:
        return _serve(args) if args.command == "serve" else _models(args)
    except ConfigError as exc:
        print(f"multiserve: {exc}", file=sys.stderr)
        return 2
