"""The repository's benchmarks, one module each; run one from the repository root as

    .venv/bin/python -m benchmarks.serving_core --help

(`make bench` runs them all). What they share (servers, streams, noise, verdicts) is in
`benchmarks.common`, so each benchmark file holds only what it measures.
"""
