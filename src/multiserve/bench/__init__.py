"""`multiserve bench` / `multiserve compare`: a careful load tester for OpenAI-compatible servers.

Metrics follow vLLM's `bench serve` (benchmark_serving.py) and its JSON field names, so results
read the same whichever server (multiserve, llama-server, llama-cpp-python, vLLM) was measured.
"""
