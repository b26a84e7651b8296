"""multiserve: several GGUF models behind one OpenAI-compatible endpoint, batched on llama.cpp."""

__version__ = "0.1.0"
