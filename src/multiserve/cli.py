"""Command line: `multiserve serve` runs the server, `multiserve models` describes a config,
`multiserve route` shows where the router sends a message."""

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
    EMBEDDED_MAX_TOKENS,
    ConfigError,
    ModelSpec,
    SamplingDefaults,
    Settings,
    load_settings,
)


def build_parser() -> argparse.ArgumentParser:
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
    serve.add_argument(
        "--ray",
        dest="ray_address",
        metavar="ADDRESS",
        help="run the models on this Ray cluster (host:port of its head, or `auto`)",
    )
    models = sub.add_parser(
        "models", parents=[models_from], help="list models: size, memory, state"
    )
    models.add_argument(
        "--ray",
        dest="ray_address",
        metavar="ADDRESS",
        help="instead: list the Ray cluster's nodes and where its models run",
    )
    route = sub.add_parser(
        "route",
        help='print where `"model": "auto"` would send a message, without a server',
        description="The router's decision for one message, as the server would take it with "
        "no model loaded: the rule, the models in order, why, the detected language, the time.",
    )
    route.add_argument("--config", type=Path, required=True, help="config with a [router]")
    route.add_argument("text", help="the last user message")
    route.add_argument("--system", default="", help="a system prompt")
    route.add_argument("--tools", action="store_true", help="the request offers tools")
    route.add_argument("--json-schema", action="store_true", help="it asks for JSON output")
    route.add_argument("--image", action="store_true", help="it carries an image part")
    route.add_argument("--json", action="store_true", help="print the decision as JSON")
    _bench_parsers(sub)
    return parser


def _bench_parsers(sub: argparse._SubParsersAction) -> None:
    """`bench` and `compare`: a bounded load tester for any OpenAI-compatible server."""
    bench = sub.add_parser(
        "bench",
        help="load-test an OpenAI-compatible server (vLLM bench serve metrics)",
        description="Streamed requests against ANY OpenAI-compatible server; TTFT, TPOT, ITL, "
        "E2EL and throughput as vLLM's `bench serve` reports them. Bounded: at most "
        "--max-inflight requests in flight, --requests per load point, --duration seconds per "
        "load point; stops when --max-error-rate of the last 20 requests failed.",
    )
    target = bench.add_argument_group("target")
    target.add_argument("--url", required=True, help="server base URL, e.g. http://127.0.0.1:8082")
    target.add_argument("--model", required=True, help="model id to request")
    target.add_argument("--api-key", help="sent as `Authorization: Bearer` (never written out)")
    target.add_argument("--endpoint", choices=("chat", "completions"), default="chat")
    target.add_argument(
        "--precheck",
        action="store_true",
        help="GET /health must be 200; refuse if /stats shows a deep queue for the model",
    )
    work = bench.add_argument_group("workload")
    work.add_argument("--input-tokens", type=int, default=128, help="synthetic prompt words")
    work.add_argument("--output-tokens", type=int, default=128, help="max_tokens per request")
    work.add_argument(
        "--prompts-file", type=Path, help='JSONL: {"prompt": ...} or {"messages": [...]} a line'
    )
    work.add_argument(
        "--seed", type=int, help="prompts and arrivals (default 0); also sent as `seed` if given"
    )
    work.add_argument("--ignore-eos", action="store_true", help="send ignore_eos (non-standard)")
    work.add_argument("--temperature", type=float, help="sampling temperature (server default)")
    load = bench.add_argument_group("load")
    load.add_argument("--concurrency", type=int, help="closed loop: requests kept in flight")
    load.add_argument("--rate", type=float, help="open loop: mean requests/s (inf: no gaps)")
    load.add_argument("--burstiness", type=float, default=1.0, help="gamma shape (1: Poisson)")
    load.add_argument("--sweep-concurrency", metavar="N,N,..", help="e.g. 1,2,4,8")
    load.add_argument("--sweep-rate", metavar="R,R,..", help="e.g. 0.5,1,2")
    load.add_argument(
        "--requests", "--max-requests", type=int, default=200, help="per load point (200)"
    )
    load.add_argument(
        "--duration", "--max-duration", type=float, default=300.0, help="s per load point (300)"
    )
    load.add_argument("--warmup", type=int, default=1, help="untimed requests first (1)")
    safety = bench.add_argument_group("safety")
    safety.add_argument("--max-inflight", type=int, default=64, help="hard in-flight cap (64)")
    safety.add_argument(
        "--max-error-rate", type=float, default=0.5, help="stop above this (last 20) (0.5)"
    )
    safety.add_argument("--max-retries", type=int, default=3, help="retries of 429/503 (3)")
    safety.add_argument("--timeout", type=float, default=120.0, help="s per request (120)")
    report = bench.add_argument_group("report")
    report.add_argument("--slo", help="goodput targets, e.g. ttft:500,tpot:50,e2el:3000 (ms)")
    report.add_argument("--out", type=Path, help="results JSON file")
    report.add_argument("--plot", type=Path, metavar="DIR", help="write PNG plots to DIR")
    report.add_argument(
        "--quiet", action="store_true", help="no progress bar or table: a short summary on stderr"
    )

    compare = sub.add_parser(
        "compare",
        help="compare bench results files side by side",
        description="Each metric of B, C, ... against A: % change, green when better, red when "
        "worse (throughput: higher is better; latency: lower is better).",
    )
    compare.add_argument("files", type=Path, nargs="+", metavar="RESULTS.json")
    compare.add_argument("--plot", type=Path, metavar="FILE", help="write a PNG bar chart")


def _settings(args: argparse.Namespace) -> Settings:
    """The config file, plus `--model` (or, with no models at all, the embedded default)."""
    overrides = {k: getattr(args, k, None) for k in ("host", "port", "threads", "ray_address")}
    settings = load_settings(args.config, overrides)
    model = args.model
    if model is None and settings.models:
        return settings
    defaults = SamplingDefaults()
    companions: list[ModelSpec] = []
    if model is None:
        from multiserve.models.default import (
            DEFAULT_EMBEDDINGS_ID,
            DEFAULT_MODEL_ID,
            default_model_path,
        )

        model, model_id = default_model_path(), DEFAULT_MODEL_ID
        defaults = SamplingDefaults(max_tokens=EMBEDDED_MAX_TOKENS)
        # /v1/embeddings works out of the box: the same file in an embeddings context of its
        # own, loaded on the first embeddings request
        companions = [ModelSpec(id=DEFAULT_EMBEDDINGS_ID, path=model.resolve(), embedding=True)]
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
            defaults=defaults,
            embeddings_model=companions[0].id if companions else None,
        )
        models = [spec, *companions, *settings.models]
        return Settings(**{**dict(settings), "models": models})
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
    from multiserve.api.app import create_app
    from multiserve.api.server import listen_socket, serve

    settings = _settings(args)
    sock = listen_socket(settings.host, settings.port)
    if settings.ray_address is not None:  # said at once, not as a failed startup's traceback
        from multiserve.backends.ray_cluster import join_cluster

        try:
            join_cluster(settings.ray_address)
        except ConnectionError as exc:
            raise ConfigError(str(exc)) from None
    if warning := exposure_warning(settings):
        print(f"multiserve: WARNING: {warning}", file=sys.stderr)
    app = create_app(settings)
    print(
        f"multiserve: serving {', '.join(s.id for s in settings.models)} on "
        f"http://{settings.host}:{settings.port}",
        file=sys.stderr,
    )
    serve(app, settings, sock)
    return 0


def _cluster_models(address: str) -> int:
    """Print a Ray cluster's nodes and the models running on them; 1 if it cannot be joined."""
    from rich.console import Console
    from rich.table import Table

    from multiserve.backends.ray_cluster import join_cluster, live_nodes, model_hosts
    from multiserve.fleet.memory import format_bytes

    try:
        ray = join_cluster(address)
    except ConnectionError as exc:
        print(f"multiserve: {exc}", file=sys.stderr)
        return 1
    nodes = Table("node", "memory", "CPUs", title="nodes that can run models")
    for node in live_nodes(ray):
        nodes.add_row(node.placement.node, format_bytes(node.memory), str(node.cpus))
    models = Table("model", "node", "worker pid", "resident memory", "placed by")
    for host in sorted(model_hosts(ray), key=lambda h: (h.model_id or "", h.node)):
        rss = format_bytes(host.rss) if host.rss is not None else "-"
        pid = str(host.worker_pid) if host.worker_pid is not None else "-"
        models.add_row(host.model_id or "(loading)", host.node, pid, rss, host.owner)
    Console().print(nodes)
    Console().print(models)
    return 0


def _models(args: argparse.Namespace) -> int:
    """Print each model's size, memory estimate and whether it can load; 1 if one cannot."""
    if args.ray_address is not None:
        return _cluster_models(args.ray_address)
    import psutil
    from rich.console import Console
    from rich.table import Table

    from multiserve.config import parse_budget
    from multiserve.fleet.gguf_header import GGUFError, read_header
    from multiserve.fleet.memory import estimate_memory, format_bytes

    settings = _settings(args)
    budget = parse_budget(settings.memory_budget, psutil.virtual_memory().available)
    table = Table("id", "aliases", "file size", "estimated memory", "state")
    usable = True
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
            if est.total > budget:
                state = f"[red]needs more than the memory budget ({format_bytes(budget)})[/red]"
        except FileNotFoundError:
            state = "[red]file not found[/red]"
        except (GGUFError, OSError) as exc:
            state = f"[red]unreadable: {exc}[/red]"
        usable = usable and state == "ready"
        table.add_row(spec.id, ", ".join(spec.aliases), size, estimate, state)
    Console().print(table)
    Console().print(f"memory budget: {format_bytes(budget)} ({settings.memory_budget})")
    return 0 if usable else 1


def _route(args: argparse.Namespace) -> int:
    """Print the router's decision for `args.text` under the config's `[router]`."""
    import json

    from multiserve.api.auto import chat_route
    from multiserve.api.schemas import ChatCompletionRequest
    from multiserve.router.config import AUTO_MODEL
    from multiserve.router.decision import ColdFleet, Router
    from multiserve.router.language import detect_language, warm_up

    settings = load_settings(args.config)
    if settings.router is None:
        raise ConfigError(f"{args.config}: no [router] section, so `auto` is not served")
    warm_up()  # timed as a server decides: with the language model loaded
    router = Router(settings.router, settings.model_id, detect_language)
    content: list[dict] = [{"type": "text", "text": args.text}]
    if args.image:
        content.append({"type": "image_url", "image_url": {"url": "data:image/png;base64,"}})
    messages = [{"role": "system", "content": args.system}] if args.system else []
    body: dict = {
        "model": AUTO_MODEL,
        "messages": [*messages, {"role": "user", "content": content}],
    }
    if args.tools:
        function = {"name": "tool", "parameters": {"type": "object"}}
        body["tools"] = [{"type": "function", "function": function}]
    if args.json_schema:
        body["response_format"] = {"type": "json_object"}
    request = chat_route(ChatCompletionRequest.model_validate(body), client="cli")
    decision = router.decide(request, ColdFleet())
    shown = {
        "rule": decision.rule,
        "models": list(decision.targets),
        "reason": decision.reason,
        "fallthrough": decision.fallthrough,
        "language": decision.language,
        "decision_ms": round(decision.seconds * 1000, 3),
    }
    if args.json:
        print(json.dumps(shown, ensure_ascii=False))
    else:
        for key, value in shown.items():
            print(f"{key:>12}: {', '.join(value) if isinstance(value, list) else value}")
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    args = build_parser().parse_args(argv)
    try:
        if args.command == "bench":
            from multiserve.bench.command import run_bench

            return run_bench(args)
        if args.command == "compare":
            from multiserve.bench.command import run_compare

            return run_compare(args)
        if args.command == "route":
            return _route(args)
        return _serve(args) if args.command == "serve" else _models(args)
    except ConfigError as exc:
        print(f"multiserve: {exc}", file=sys.stderr)
        return 2
