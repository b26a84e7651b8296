"""A Ray cluster of simulated nodes on this machine: for the Ray backend's tests and benchmarks,
and for trying `--ray` without a second machine (docs/cluster.md shows the same with `ray start`).

Each node is a real raylet with its own `memory` and `CPU` resources (Ray's
`ray.cluster_utils.Cluster`), so placement, eviction and a node's death behave as on separate
machines; the head runs nothing (no CPUs), as on a cluster whose head only coordinates. Health
checks are tightened so a killed node is declared dead in about two seconds, not fifteen.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator

from ray.cluster_utils import Cluster

from multiserve.backends.ray_cluster import RAY_ENVIRONMENT

FAST_HEALTH_CHECKS = {
    "health_check_initial_delay_ms": 500,
    "health_check_period_ms": 500,
    "health_check_timeout_ms": 500,
    "health_check_failure_threshold": 3,
}


@contextlib.contextmanager
def local_cluster(memories: list[int], cpus: int = 2) -> Iterator[tuple[Cluster, list]]:
    """A head and one node per entry of `memories` (bytes of Ray `memory` each); yields the
    cluster and the nodes' handles (for `cluster.remove_node`). Servers started meanwhile
    inherit the environment it needs (short socket paths under RAY_TMPDIR)."""
    scratch = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # Unix socket paths must stay short
    saved = {key: os.environ.get(key) for key in (*RAY_ENVIRONMENT, "RAY_TMPDIR")}
    os.environ.update(RAY_ENVIRONMENT, RAY_TMPDIR=scratch)
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 0,
            "include_dashboard": False,
            "_system_config": FAST_HEALTH_CHECKS,
        },
    )
    try:
        nodes = [cluster.add_node(num_cpus=cpus, memory=memory) for memory in memories]
        cluster.wait_for_nodes()
        yield cluster, nodes
    finally:
        cluster.shutdown()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        shutil.rmtree(scratch, ignore_errors=True)
