"""Routing `"model": "auto"`: rules over a request's language, text, needs and size pick a model."""
