"""Write (or find in the cache) shape-true models and compare their sizes with the real files.

    .venv/bin/python -m benchmarks.shapes [NAME ...] [--plan-only | --check] [--seed 0]
                                          [--cache DIR] [--threads 2] [--tokens 16]

NAME is one of the five experts (phi4, mistral, qwen, gemma3, aya_expanse_multilingual) or
llama-3.2-1b; none means the five. Each line: tensors by type, the file's size against the
published size of the real Q4_K_M file, and the path. With --plan-only nothing is written (the
sizes are the tensors' bytes alone). With --check each file is also loaded and decoded by
llama.cpp (benchmarks/shapes/probe.py, a process each): the parameters and bytes it counts must
be the plan's, and decoding must read the weights at a like rate for every model (bytes x tokens/s
within 30% of the models' median: a model much slower than its size says is not shape-true).
Exit status 1 if a size is more than 2% off or a check fails.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from collections import Counter
from pathlib import Path

from benchmarks.shapes.gguf_file import CACHE, cached_model, data_bytes
from benchmarks.shapes.specs import EXPERTS, SHAPES, ModelShape, tensor_plan

TOLERANCE = 0.02
RATE_SPREAD = 0.30


def describe(shape: ModelShape, size: int, where: str) -> tuple[str, bool]:
    plan = tensor_plan(shape)
    types = Counter(t.qtype.name for t in plan)
    mix = " ".join(f"{name} {count}" for name, count in sorted(types.items()))
    off = size / shape.published_bytes - 1
    line = (
        f"{shape.name:<26} {len(plan):4d} tensors ({mix}); {size / 1e9:6.3f} GB against "
        f"{shape.published_bytes / 1e9:.3f} GB ({off:+.2%}); {where}"
    )
    return line, abs(off) <= TOLERANCE


def check(shape: ModelShape, path: Path, threads: int, tokens: int) -> dict:
    """llama.cpp's view of the file (see probe.py), run in a process of its own."""
    command = [sys.executable, "-m", "benchmarks.shapes.probe", str(path)]
    command += ["--threads", str(threads), "--tokens", str(tokens)]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=3600)
    except subprocess.TimeoutExpired:
        return {"error": ["no answer within an hour"]}
    if result.returncode != 0:
        return {"error": result.stderr.strip().splitlines()[-1:]}
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    plan = tensor_plan(shape)
    seen["as_planned"] = seen["params"] == sum(t.values for t in plan) and seen["bytes"] == sum(
        data_bytes(t) for t in plan
    )
    return seen


def report_checks(checks: dict[str, dict]) -> bool:
    """Print what llama.cpp saw of each model; True if every one is as planned and decodes at a
    rate its size explains."""
    rates = {
        n: c["bytes"] * c["decode_tokens_per_second"] for n, c in checks.items() if "bytes" in c
    }
    median = statistics.median(rates.values()) if rates else 0.0
    ok = True
    for name, seen in checks.items():
        if "error" in seen:
            print(f"{name:<26} llama.cpp failed: {seen['error']}")
            ok = False
            continue
        consistent = abs(rates[name] / median - 1) <= RATE_SPREAD
        good = seen["as_planned"] and seen["finite"] and consistent
        ok = ok and good
        print(
            f"{name:<26} {seen['params'] / 1e9:6.2f} B parameters, {seen['bytes'] / 1e9:6.3f} GB "
            f"{'as planned' if seen['as_planned'] else 'NOT as planned'}; loaded in "
            f"{seen['load_seconds']:.1f} s; {seen['decode_tokens_per_second']:.2f} tokens/s = "
            f"{rates[name] / 1e9:.1f} GB of weights read per second"
            f"{'' if consistent else ' (not like the others)'}"
            f"{'' if seen['finite'] else '; NON-FINITE logits'}"
        )
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", metavar="NAME", help=", ".join(SHAPES))
    parser.add_argument("--plan-only", action="store_true", help="write nothing")
    parser.add_argument("--check", action="store_true", help="load and decode each in llama.cpp")
    parser.add_argument("--threads", type=int, default=2, help="decode threads for --check")
    parser.add_argument(
        "--tokens",
        type=int,
        default=16,
        choices=range(1, 4097),
        metavar="1..4096",
        help="tokens decoded by --check",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache", type=Path, default=CACHE)
    args = parser.parse_args(argv)
    if unknown := set(args.names) - set(SHAPES):
        parser.error(f"unknown model {', '.join(sorted(unknown))}; known: {', '.join(SHAPES)}")
    ok = True
    checks: dict[str, dict] = {}
    for name in args.names or EXPERTS:
        shape = SHAPES[name]
        if args.plan_only:
            size, where = sum(data_bytes(t) for t in tensor_plan(shape)), "tensors only"
        else:
            path = cached_model(shape, args.seed, args.cache)
            size, where = path.stat().st_size, str(path)
        line, within = describe(shape, size, where)
        print(line if within else f"{line}  [more than {TOLERANCE:.0%} off]")
        ok = ok and within
        if args.check and not args.plan_only:
            checks[name] = check(shape, path, args.threads, args.tokens)
    if checks:
        ok = report_checks(checks) and ok
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
