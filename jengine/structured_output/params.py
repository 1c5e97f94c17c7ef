"""`StructuredOutputsParams`: the constraint a request's output must satisfy (vLLM's names).

Pure data with shape checks only, so `jengine.sampling_params` can import it without the grammar
library; whether a schema, regex or grammar is *valid* is decided when the engine compiles it
(`jengine.structured_output.backend`), which raises ValueError naming the field.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any, Optional, Union

_KINDS = ("json", "regex", "choice", "grammar", "json_object")


@dataclasses.dataclass(frozen=True)
class StructuredOutputsParams:
    """Exactly one of the fields is set.

    json: a JSON schema (dict or JSON string); the output is one JSON value it accepts.
    regex: the whole output matches this regular expression (`\\d` is an ASCII digit).
    choice: the output is exactly one of these strings.
    grammar: a context-free grammar in the `::=` EBNF/GBNF form (`root ::= ...`); Lark-style
        grammars (`start: ...`) are accepted as is.
    json_object: the output is any JSON object.
    """

    json: Optional[Union[str, dict[str, Any]]] = None
    regex: Optional[str] = None
    choice: Optional[list[str]] = None
    grammar: Optional[str] = None
    json_object: Optional[bool] = None

    def __post_init__(self) -> None:
        if self.choice is not None and not isinstance(self.choice, list):
            object.__setattr__(self, "choice", list(self.choice))
        self.verify()

    @property
    def kind(self) -> str:
        """Which field is set: "json", "regex", "choice", "grammar" or "json_object"."""
        return next(k for k in _KINDS if _is_set(self, k))

    def verify(self) -> None:
        """Raises ValueError naming the field when the parameters are not well-formed."""
        set_fields = [k for k in _KINDS if _is_set(self, k)]
        if len(set_fields) != 1:
            raise ValueError(
                "StructuredOutputsParams: exactly one of json, regex, choice, grammar, json_object must be set, "
                f"got {set_fields or 'none'}")
        if self.json is not None:
            _check(isinstance(self.json, (str, dict)), "json", f"must be a JSON schema (dict or str), got {type(self.json).__name__}")
            if isinstance(self.json, str):
                try:
                    value = json.loads(self.json)
                except ValueError as e:
                    raise ValueError(f"StructuredOutputsParams.json is not valid JSON: {e}") from None
                _check(isinstance(value, (dict, bool)), "json", "must be a JSON schema object")
        if self.regex is not None:
            _check(isinstance(self.regex, str), "regex", f"must be a string, got {type(self.regex).__name__}")
        if self.choice is not None:
            _check(len(self.choice) > 0, "choice", "must not be empty")
            _check(all(isinstance(c, str) and c for c in self.choice), "choice", "must be non-empty strings")
        if self.grammar is not None:
            _check(isinstance(self.grammar, str) and self.grammar.strip() != "", "grammar", "must be a non-empty string")
        if self.json_object is not None:
            _check(self.json_object is True, "json_object", f"must be True when given, got {self.json_object!r}")

    def cache_key(self) -> str:
        """A stable hash of the constraint (what the engine caches compiled grammars by)."""
        value: Any = getattr(self, self.kind)
        if self.kind == "json" and isinstance(value, str):
            value = json.loads(value)
        text = json.dumps([self.kind, value], sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()


def _is_set(p: StructuredOutputsParams, name: str) -> bool:
    value = getattr(p, name)
    return value is not None and value is not False


def _check(ok: bool, field: str, message: str) -> None:
    if not ok:
        raise ValueError(f"StructuredOutputsParams.{field} {message}")
