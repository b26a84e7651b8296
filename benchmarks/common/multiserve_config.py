"""multiserve on a generated TOML config: the model tables a benchmark needs, served on loopback.

The embedded model serves every table, under whatever ids a benchmark needs; the config's text is
returned so reports can keep exactly what was measured.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Sequence
from pathlib import Path

from benchmarks.common.servers import HOST, RunningServer, multiserve_command, serving
from multiserve.config import EMBEDDED_MODEL


def toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(item) for item in value) + "]"
    return json.dumps(str(value))  # a JSON string of plain text is a valid TOML basic string


def model_table(model_id: str, **fields: object) -> dict[str, object]:
    """A `[[models]]` table serving the embedded model as `model_id`."""
    return {"id": model_id, "path": EMBEDDED_MODEL, **fields}


def config_text(
    threads: int,
    models: Sequence[dict[str, object]],
    share_cores: bool = True,
    server_fields: dict[str, object] | None = None,
) -> str:
    lines = [f"host = {toml_value(HOST)}", f"threads = {threads}"]
    lines.append(f"share_cores = {toml_value(share_cores)}")
    lines += [f"{k} = {toml_value(v)}" for k, v in (server_fields or {}).items()]
    for model in models:
        lines += ["", "[[models]]", *(f"{k} = {toml_value(v)}" for k, v in model.items())]
    return "\n".join(lines) + "\n"


@contextlib.contextmanager
def serving_config(
    name: str,
    config: str,
    directory: Path,
    port: int,
    loaded: Sequence[str] = (),
    timeout_s: float = 120.0,
) -> Iterator[RunningServer]:
    """`multiserve serve --config` on `config` (written to directory/name.toml, its log beside),
    ready once /health answers and every model in `loaded` is loaded."""
    path = directory / f"{name}.toml"
    path.write_text(config)
    command = multiserve_command(port, "--config", str(path))
    log = directory / f"{name}.log"
    with serving(name, command, port, log, loaded=loaded, timeout_s=timeout_s) as server:
        yield server
