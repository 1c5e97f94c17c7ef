"""Structured outputs: constrain a request's tokens to a JSON schema, regex, choice or grammar.

`params` (no dependencies): `StructuredOutputsParams`. `backend`: llguidance compilation and the
tokenizer bridge. `manager`: per-sequence matchers and the step's packed token bitmasks, which
`jengine.sampler` applies on the device. `reasoning`: the thinking markers of reasoning models, so a
constraint covers only the answer.
"""
from jengine.structured_output.params import StructuredOutputsParams

__all__ = ["StructuredOutputsParams", "StructuredOutputManager"]


def __getattr__(name: str):
    if name == "StructuredOutputManager":  # lazy: keeps numpy/llguidance out of `import jengine.sampling_params`
        from jengine.structured_output.manager import StructuredOutputManager

        return StructuredOutputManager
    raise AttributeError(f"module 'jengine.structured_output' has no attribute {name!r}")
