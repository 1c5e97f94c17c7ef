"""User-facing entry points of the Python API: `LLM`, the offline batch interface shaped like vLLM's."""
