"""Chat templates: render chat messages to prompts inside a Jinja2 sandbox."""
