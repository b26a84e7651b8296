"""Command line: `multiserve serve` (more subcommands join as they are built)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from multiserve.config import DEFAULT_HOST, DEFAULT_PORT, ConfigError, ModelSpec, load_settings


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="multiserve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the OpenAI-compatible server")
    serve.add_argument("--config", type=Path, help="TOML or JSON config file")
    serve.add_argument("--model", type=Path, help="a GGUF file to serve (instead of the default)")
    serve.add_argument("--model-id", help="id to serve --model under (default: file name)")
    serve.add_argument("--host", help=f"bind address (default {DEFAULT_HOST})")
    serve.add_argument("--port", type=int, help=f"port (default {DEFAULT_PORT})")
    serve.add_argument("--threads", type=int, help="compute threads (default: physical cores)")
    serve.add_argument("--parallel", type=int, default=8, help="sequence slots for --model")
    serve.add_argument("--ctx", type=int, default=4096, help="context per sequence for --model")
    return parser


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from multiserve.api.app import create_app

    overrides = {"host": args.host, "port": args.port, "threads": args.threads}
    try:
        settings = load_settings(args.config, overrides)
        preload: tuple[str, ...] = ()
        if args.model is not None or not settings.models:
            path = args.model
            model_id = args.model_id
            if path is None:
                from multiserve.models.default import DEFAULT_MODEL_ID, default_model_path

                path, model_id = default_model_path(), model_id or DEFAULT_MODEL_ID
            spec = ModelSpec(
                id=model_id or path.stem,
                path=path.resolve(),
                n_parallel=args.parallel,
                n_ctx=args.ctx,
            )
            settings = settings.model_copy(update={"models": [spec, *settings.models]})
            preload = (spec.id,)
        for spec in settings.models:
            if not spec.path.is_file():
                raise ConfigError(f"model {spec.id!r}: file not found: {spec.path}")
    except (ConfigError, ValueError) as exc:
        print(f"multiserve: {exc}", file=sys.stderr)
        return 2
    app = create_app(settings, preload=preload)
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


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    args = _parser().parse_args(argv)
    if args.command == "serve":
        return _serve(args)
    return 2
