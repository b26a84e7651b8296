# The two commands of the README. Each does its own setup (venv, llama.cpp build, install).
.PHONY: install serve test bench

install:
	@bash scripts/install.sh

serve: install
	.venv/bin/multiserve serve

test: install
	.venv/bin/ruff check src tests benchmarks
	.venv/bin/python -m pytest

bench:
	@MULTISERVE_EXTRAS=test,bench bash scripts/install.sh
	.venv/bin/python benchmarks/serving_core.py
	.venv/bin/python benchmarks/fleet.py
	.venv/bin/python benchmarks/peers.py
	.venv/bin/python benchmarks/soak.py
	.venv/bin/python benchmarks/real_traffic.py
