# The two commands of the README. Each does its own setup (venv, llama.cpp build, install).
.PHONY: install serve test bench

install:
	@bash scripts/install.sh

serve: install
	.venv/bin/multiserve serve

test:
	@MULTISERVE_EXTRAS=test,cluster bash scripts/install.sh
	.venv/bin/ruff check src tests benchmarks
	.venv/bin/python -m pytest

# Every benchmark runs, then the target fails if any of them missed a target (exit status 1).
BENCHMARKS = serving_core fleet peers soak real_traffic embeddings tool_calls routing expert_memory \
             experts_day ray_cluster

bench:
	@MULTISERVE_EXTRAS=test,bench,cluster bash scripts/install.sh
	@failed=""; for b in $(BENCHMARKS); do \
	  .venv/bin/python -m benchmarks.$$b || failed="$$failed $$b"; \
	done; \
	if [ -n "$$failed" ]; then echo "missed a target:$$failed"; exit 1; fi
