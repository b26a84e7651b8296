"""The seed's configuration, examples/experts.toml, made to run on this machine's shape-true files.

Only what must differ here is changed, line by line, so every other setting (contexts, slots, KV
types, queues, turns, the router) is the shipped one: each expert's path becomes its shape-true
file (benchmarks/shapes), `threads` the cores the replay is given, `memory_budget` the budget
asked for; and, for the expert-by-expert phase, nothing is preloaded or pinned, so every load can
be timed.
"""

from __future__ import annotations

import re
from pathlib import Path

from benchmarks.common.multiserve_config import toml_value
from benchmarks.shapes.gguf_file import cached_model
from benchmarks.shapes.specs import EXPERTS, ModelShape
from multiserve.config import Settings, load_settings

SEED = Path(__file__).resolve().parents[2] / "examples" / "experts.toml"
_KEY = re.compile(r"^(\w+)\s*=\s*(.*)$")


def seed_text(threads: int, budget: str, pinned: bool) -> str:
    """experts.toml's text with the changes above; with `pinned` false, `preload` and `pinned`
    are turned off."""
    lines, model, top = [], "", True
    for line in SEED.read_text().splitlines():
        if line.startswith("[["):
            top = False
        if match := _KEY.match(line):
            key, value = match.groups()
            if key == "id":
                model = value.strip('"')
            elif key == "path":
                line = f"path = {toml_value(cached_model(shape_of(model)))}"
            elif top and key == "threads":
                line = f"threads = {threads}"
            elif top and key == "memory_budget":
                line = f"memory_budget = {toml_value(budget)}"
            elif key in ("preload", "pinned") and not pinned:
                line = f"{key} = false"
        lines.append(line)
    return "\n".join(lines) + "\n"


def shape_of(model_id: str) -> ModelShape:
    try:
        return EXPERTS[model_id]
    except KeyError:
        raise SystemExit(f"{SEED.name}: no shape-true model for `{model_id}`") from None


def written(text: str, path: Path) -> Settings:
    """Write the config and read it back as the server will (and check every path was set)."""
    path.write_text(text)
    settings = load_settings(path)
    for spec in settings.models:
        if spec.path != cached_model(shape_of(spec.id)):
            raise SystemExit(f"{path}: `{spec.id}` still points at {spec.path}")
    return settings
