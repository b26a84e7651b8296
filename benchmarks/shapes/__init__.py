"""Shape-true models: the five experts' real GGUF layouts with seeded random weights."""
