"""Bounded, validated GGUF parsing (work in progress: full parser lands next)."""


class GGUFError(ValueError):
    """A GGUF file (or its model content) is malformed or unsupported. The message is one line."""
