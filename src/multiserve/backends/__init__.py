"""Where model workers run: this machine (`local`) or the nodes of a Ray cluster (`ray`).

The fleet decides what is loaded and when; a backend decides where and runs it. Both give the
fleet the same `ModelClient` for a running model.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from multiserve.backends.client import Reservation, RunningModel
from multiserve.config import ModelSpec, Settings
from multiserve.engine.protocol import WorkerConfig
from multiserve.fleet.gguf_header import GGUFHeader


class Backend(Protocol):
    """What the fleet needs from a place to run models."""

    fixed_size: bool  # its room never grows while serving (a Ray cluster's may)
    missing_file: str  # what a model whose file is not found is told

    async def start(self) -> None:
        """Get ready to load models (the local spare worker; joining the Ray cluster)."""

    async def stop(self) -> None:
        """Release what `start` took (models are stopped by the fleet first)."""

    async def read_header(self, path: Path) -> GGUFHeader:
        """The GGUF header of a model file, read where the model will be loaded."""

    def place(
        self,
        spec: ModelSpec,
        needed: int,
        held: list[Reservation],
        avoid: frozenset[str] = frozenset(),
    ) -> Reservation | None:
        """Room for `spec` (`needed` bytes and its threads) beside what is `held`, on no node
        in `avoid`, or None."""

    def too_large(self, spec: ModelSpec, needed: int) -> str | None:
        """Why no place could ever hold `spec`, or None if one could."""

    def client(
        self,
        config: WorkerConfig,
        reservation: Reservation,
        on_exit: Callable[[RunningModel], None],
    ) -> RunningModel:
        """A client for the model's workers, to be started as reserved (not started yet)."""

    def memory(self, held: list[Reservation]) -> dict:
        """`/stats` memory view: capacity and reservations."""


def make_backend(settings: Settings) -> Backend:
    """The local backend, or the Ray one when `ray_address` is set (Ray is imported only then)."""
    if settings.ray_address is not None:
        from multiserve.backends.ray_cluster import RayBackend

        return RayBackend(settings)
    from multiserve.backends.local import LocalBackend

    return LocalBackend(settings)
