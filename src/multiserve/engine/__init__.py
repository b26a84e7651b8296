"""Model execution: one worker process per model, continuous batching over llama.cpp."""
