"""Tool calling: how each model family writes calls, prompting with tools, reading calls back."""
